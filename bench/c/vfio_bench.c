/* The C side of bench/vfio_bench.py: the same work as the Python side, on an edu
 * device bound to vfio-pci, through the container/group API.
 *
 *   vfio_bench GROUP BDF mmio-read|mmio-write|dma|irq N
 *
 * Prints the nanoseconds per operation of one run of N operations. The irq mode
 * waits as pcipass's EventFd.wait does: read() the eventfd, and only if it was
 * not signalled yet, poll() on it and read() again.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s GROUP BDF mmio-read|mmio-write|dma|irq N\n", argv[0]); return 2; }
    const char *mode = argv[3];
    long n = atol(argv[4]);
    char path[64];
    int container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0) die("open container");
    snprintf(path, sizeof path, "/dev/vfio/%s", argv[1]);
    int group = open(path, O_RDWR);
    if (group < 0) die("open group");
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container)) die("VFIO_GROUP_SET_CONTAINER");
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) die("VFIO_SET_IOMMU");
    int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
    if (device < 0) die("VFIO_GROUP_GET_DEVICE_FD");
    struct vfio_region_info reg = { .argsz = sizeof reg, .index = 0 };
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &reg)) die("VFIO_DEVICE_GET_REGION_INFO");
    volatile uint32_t *bar = mmap(NULL, reg.size, PROT_READ | PROT_WRITE, MAP_SHARED, device, reg.offset);
    if (bar == MAP_FAILED) die("mmap BAR0");
    /* memory decoding and bus mastering on, through the config region */
    struct vfio_region_info cfg = { .argsz = sizeof cfg, .index = VFIO_PCI_CONFIG_REGION_INDEX };
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &cfg)) die("config region");
    uint16_t cmd;
    if (pread(device, &cmd, 2, cfg.offset + 4) != 2) die("read command");
    cmd |= 0x6;
    if (pwrite(device, &cmd, 2, cfg.offset + 4) != 2) die("write command");

    uint64_t t0 = 0, t1 = 0;
    if (!strcmp(mode, "mmio-read")) {
        uint32_t sink = 0;
        t0 = now_ns();
        for (long i = 0; i < n; i++) sink += bar[1];
        t1 = now_ns();
        if (sink == 0x12345) fprintf(stderr, " ");
    } else if (!strcmp(mode, "mmio-write")) {
        t0 = now_ns();
        for (long i = 0; i < n; i++) bar[1] = (uint32_t)i;
        t1 = now_ns();
    } else if (!strcmp(mode, "dma")) {
        void *buf = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (buf == MAP_FAILED) die("mmap buffer");
        struct vfio_iommu_type1_dma_map map = { .argsz = sizeof map,
            .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            .vaddr = (uintptr_t)buf, .iova = 0x100000, .size = 4096 };
        struct vfio_iommu_type1_dma_unmap unmap = { .argsz = sizeof unmap, .iova = 0x100000, .size = 4096 };
        t0 = now_ns();
        for (long i = 0; i < n; i++) {
            if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map)) die("VFIO_IOMMU_MAP_DMA");
            if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap)) die("VFIO_IOMMU_UNMAP_DMA");
        }
        t1 = now_ns();
    } else if (!strcmp(mode, "irq")) {
        int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        char irqbuf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
        struct vfio_irq_set *set = (struct vfio_irq_set *)irqbuf;
        set->argsz = sizeof irqbuf;
        set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        set->index = VFIO_PCI_MSI_IRQ_INDEX;
        set->start = 0;
        set->count = 1;
        memcpy(set->data, &efd, sizeof efd);
        if (ioctl(device, VFIO_DEVICE_SET_IRQS, set)) die("VFIO_DEVICE_SET_IRQS");
        struct pollfd pfd = { .fd = efd, .events = POLLIN };
        uint64_t count;
        t0 = now_ns();
        for (long i = 0; i < n; i++) {
            bar[0x60 / 4] = 0x8000;                 /* raise */
            if (read(efd, &count, 8) != 8) {       /* not signalled yet: wait */
                if (errno != EAGAIN) die("read eventfd");
                if (poll(&pfd, 1, 5000) != 1) die("no interrupt");
                if (read(efd, &count, 8) != 8) die("read eventfd");
            }
            bar[0x64 / 4] = 0x8000;                 /* acknowledge */
        }
        t1 = now_ns();
        set->argsz = sizeof *set;
        set->flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
        set->count = 0;
        ioctl(device, VFIO_DEVICE_SET_IRQS, set);
        close(efd);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    printf("%.1f\n", (double)(t1 - t0) / n);
    return 0;
}

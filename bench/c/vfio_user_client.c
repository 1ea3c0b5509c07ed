/*
 * A minimal vfio-user client for the round-trip benchmark: VERSION, then on
 * every line read from stdin, OPS 4-byte REGION_READs of REGION at OFFSET,
 * one in flight, and the mean nanoseconds per read printed on stdout. The
 * reply is checked (id, command, reply flag, size) and nothing else is done:
 * one write and, usually, one read per request.
 *
 * usage: vfio_user_client SOCKET_PATH REGION OFFSET OPS
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct hdr { uint16_t id, cmd; uint32_t size, flags, error; };
struct region_access { uint64_t offset; uint32_t region, count; };

static char in[1 << 16];

/* Read one whole message into `in`; its size, or -1. */
static int reply(int fd)
{
	size_t have = 0, need = sizeof(struct hdr);
	while (have < need) {
		ssize_t r = read(fd, in + have, sizeof(in) - have);
		if (r <= 0)
			return -1;
		have += (size_t)r;
		if (have >= sizeof(struct hdr)) {
			need = ((struct hdr *)in)->size;
			if (need < sizeof(struct hdr) || need > sizeof(in))
				return -1;
		}
	}
	return (int)need;
}

int main(int argc, char **argv)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	static const char caps[] = "{\"capabilities\":{\"max_msg_fds\":8}}";
	char msg[64], line[64];
	struct hdr *h = (struct hdr *)msg;
	struct region_access *ra = (struct region_access *)(msg + sizeof(*h));
	uint16_t id = 0;
	long ops;
	int fd;

	if (argc != 5 || strlen(argv[1]) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "usage: %s SOCKET_PATH REGION OFFSET OPS\n", argv[0]);
		return 2;
	}
	ops = atol(argv[4]);
	const uint64_t offset = strtoull(argv[3], NULL, 0);
	const uint32_t region = (uint32_t)atoi(argv[2]);
	strcpy(sa.sun_path, argv[1]);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		perror(argv[1]);
		return 1;
	}
	/* VERSION 0.1 with a capabilities object */
	*h = (struct hdr){ .id = id, .cmd = 1, .size = (uint32_t)(sizeof(*h) + 4 + sizeof(caps)) };
	msg[16] = 0; msg[17] = 0; msg[18] = 1; msg[19] = 0;
	memcpy(msg + 20, caps, sizeof(caps));
	if (write(fd, msg, h->size) != (ssize_t)h->size || reply(fd) < 0 || ((struct hdr *)in)->flags & 0x20) {
		fprintf(stderr, "VERSION failed\n");
		return 1;
	}
	while (fgets(line, sizeof(line), stdin)) {
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		for (long i = 0; i < ops; i++) {
			struct hdr *r = (struct hdr *)in;
			*h = (struct hdr){ .id = ++id, .cmd = 9, .size = sizeof(*h) + sizeof(*ra) };
			*ra = (struct region_access){ .offset = offset, .region = region, .count = 4 };
			if (write(fd, msg, h->size) != (ssize_t)h->size || reply(fd) != 36 || r->id != id || r->cmd != 9
			    || (r->flags & 0x2f) != 1) {
				fprintf(stderr, "bad reply to REGION_READ %u\n", id);
				return 1;
			}
		}
		clock_gettime(CLOCK_MONOTONIC, &t1);
		printf("%.1f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / ops);
		fflush(stdout);
	}
	return 0;
}

/*
 * The floor for a vfio-user round trip: a minimal server on a UNIX stream
 * socket that answers every command with a reply of the size pcipass's
 * backend would send, doing no work. REGION_READ gets its request back plus
 * `count` zero bytes (a 4-byte config read: 32 bytes in, 36 out); every
 * other command gets its payload echoed (VERSION and DEVICE_GET_INFO are
 * then valid replies for pcipass's frontend).
 *
 * usage: vfio_user_echo SOCKET_PATH   (serves one client, then exits)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

struct hdr { uint16_t id, cmd; uint32_t size, flags, error; };

static int full(int fd, void *buf, size_t n, int rd)
{
	char *p = buf;
	while (n) {
		ssize_t r = rd ? read(fd, p, n) : write(fd, p, n);
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

int main(int argc, char **argv)
{
	static char in[1 << 20], out[(1 << 20) + 64];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int ls, c;

	if (argc != 2 || strlen(argv[1]) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
		return 2;
	}
	strcpy(sa.sun_path, argv[1]);
	unlink(argv[1]);
	ls = socket(AF_UNIX, SOCK_STREAM, 0);
	if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) || listen(ls, 1)) {
		perror("socket");
		return 1;
	}
	c = accept(ls, NULL, NULL);
	for (;;) {
		struct hdr h;
		uint32_t len, extra = 0;

		if (full(c, &h, sizeof(h), 1) || h.size < sizeof(h) || h.size > sizeof(in))
			break;
		len = h.size - sizeof(h);
		if (full(c, in, len, 1))
			break;
		if (h.cmd == 9 && len >= 16) /* REGION_READ: offset, region, count */
			memcpy(&extra, in + 12, 4);
		if (extra > sizeof(out) - 64 - len)
			break;
		h.flags = 1; /* reply */
		h.size = sizeof(h) + len + extra;
		memcpy(out, &h, sizeof(h));
		memcpy(out + sizeof(h), in, len);
		memset(out + sizeof(h) + len, 0, extra);
		if (full(c, out, h.size, 0))
			break;
	}
	close(c);
	unlink(argv[1]);
	return 0;
}

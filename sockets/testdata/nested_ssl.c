/* A stand-in for a TLS library with OpenSSL's entry points, nested the way
 * some OpenSSL versions and forks implement one through another:
 * SSL_write_ex calls SSL_write, SSL_read_ex calls SSL_read until it has
 * the bytes asked for. The "SSL object" is a descriptor in a struct of no
 * known layout (no version banner): the agent finds the socket by the
 * thread's I/O. Used by TestOpenSSLNestedCallsOnce.
 *
 *   nested_ssl IP PORT   writes "hello-ex" with SSL_write_ex and "plain"
 *                        with SSL_write, then reads the 13-byte echo with
 *                        one SSL_read_ex, and prints it.
 *   nested_ssl wait      waits until its input ends (a process that maps
 *                        the program, for the agent to find).
 *   nested_ssl bench N   waits for a line on its input, then calls
 *                        SSL_write N times on an SSL object with no
 *                        socket (it "writes" to memory) and prints the
 *                        mean wall time per call in ns: the cost of the
 *                        probes of one call (BenchmarkOpenSSLProbeCost). */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct fake_ssl {
	long pad[3];
	int fd;
};

__attribute__((noinline)) int SSL_write(struct fake_ssl *s, const void *buf, int num)
{
	if (s->fd < 0)
		return num; /* a memory "BIO" */
	return write(s->fd, buf, num);
}

__attribute__((noinline)) int SSL_write_ex(struct fake_ssl *s, const void *buf, size_t num, size_t *written)
{
	int n = SSL_write(s, buf, (int)num);
	if (n <= 0)
		return 0;
	*written = n;
	return 1;
}

__attribute__((noinline)) int SSL_read(struct fake_ssl *s, void *buf, int num)
{
	return read(s->fd, buf, num);
}

__attribute__((noinline)) int SSL_read_ex(struct fake_ssl *s, void *buf, size_t num, size_t *readbytes)
{
	size_t got = 0;
	while (got < num) {
		/* At most 4 bytes per inner call: several nested reads. */
		int n = SSL_read(s, (char *)buf + got, num - got < 4 ? (int)(num - got) : 4);
		if (n <= 0)
			return 0;
		got += n;
	}
	*readbytes = got;
	return 1;
}

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "wait")) {
		char c;
		while (read(0, &c, 1) > 0)
			;
		return 0;
	}
	if (argc == 3 && !strcmp(argv[1], "bench")) {
		struct fake_ssl m = {.fd = -1};
		long n = atol(argv[2]);
		char line[16];
		if (!fgets(line, sizeof(line), stdin))
			return 1;
		struct timespec a, b;
		clock_gettime(CLOCK_MONOTONIC, &a);
		for (long i = 0; i < n; i++)
			SSL_write(&m, "x", 1);
		clock_gettime(CLOCK_MONOTONIC, &b);
		printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (double)n);
		return 0;
	}
	if (argc != 3) {
		fprintf(stderr, "usage: %s ip port\n", argv[0]);
		return 2;
	}
	struct fake_ssl s = {.fd = socket(AF_INET, SOCK_STREAM, 0)};
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
	inet_pton(AF_INET, argv[1], &sa.sin_addr);
	if (connect(s.fd, (struct sockaddr *)&sa, sizeof(sa))) {
		perror("connect");
		return 1;
	}
	size_t w = 0, r = 0;
	char buf[14] = {0};
	if (SSL_write_ex(&s, "hello-ex", 8, &w) != 1 || w != 8 || SSL_write(&s, "plain", 5) != 5)
		return 1;
	if (SSL_read_ex(&s, buf, 13, &r) != 1 || r != 13)
		return 1;
	printf("%s\n", buf);
	return 0;
}

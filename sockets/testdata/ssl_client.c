/* A minimal HTTPS client on OpenSSL's own API (SSL_set_fd, SSL_write_ex,
 * SSL_read_ex), built statically by TestOpenSSLStaticExec so that its
 * TLS code lives in the executable itself. It waits delay_ms before it
 * connects: the time the agent has to find and probe a program it has
 * never seen (see docs/benchmarks.md for how long that takes). */
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
	if (argc != 6) { fprintf(stderr, "usage: %s ip port cafile path delay_ms\n", argv[0]); return 2; }
	usleep(atoi(argv[5]) * 1000);
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	if (!SSL_CTX_load_verify_locations(ctx, argv[3], NULL)) { ERR_print_errors_fp(stderr); return 1; }
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
	inet_pton(AF_INET, argv[1], &sa.sin_addr);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa))) { perror("connect"); return 1; }
	SSL *ssl = SSL_new(ctx);
	SSL_set_fd(ssl, fd);
	if (SSL_connect(ssl) != 1) { ERR_print_errors_fp(stderr); return 1; }
	char req[512];
	int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n", argv[4], argv[1], argv[2]);
	size_t w = 0;
	if (SSL_write_ex(ssl, req, n, &w) != 1 || (int)w != n) { ERR_print_errors_fp(stderr); return 1; }
	char buf[4096]; size_t got, total = 0;
	while (SSL_read_ex(ssl, buf, sizeof(buf), &got) == 1) total += got;
	printf("%zu\n", total);
	return 0;
}

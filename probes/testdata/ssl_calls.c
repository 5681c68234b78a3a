/* A process that makes SSL calls through the machine's libssl on command,
 * for the tests of per-process uprobes (probes/uprobes_test.go). The SSL
 * object has memory BIOs and no peer: SSL_write starts a handshake and
 * returns WANT_READ, SSL_read returns WANT_READ; each is one probed call
 * (entry and return), which finds no socket and sends no event. One
 * SSL_write before "ready" makes the ClientHello, so that the later
 * calls are cheap.
 *
 * Commands, one per line on the standard input; each answers one line:
 *   calls N   N calls (SSL_write and SSL_read alternately): "done <ns per call>"
 *   fork      forks; the child answers "child <pid>" and takes the
 *             commands until "exit", while the parent waits for it
 *   texec     executes the program again from a second thread (which
 *             becomes the leader, with the process's pid): "ready <pid>"
 *   exit      ends the process (the child, after fork): no answer */
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void *reexec(void *arg)
{
	char *argv[] = {"ssl_calls", NULL};
	execv("/proc/self/exe", argv);
	perror("execv");
	exit(1);
}

int main(void)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	SSL *ssl = SSL_new(ctx);
	SSL_set_bio(ssl, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));
	SSL_set_connect_state(ssl);
	char line[64], buf[16];
	SSL_write(ssl, "x", 1); /* the ClientHello: later calls are cheap */
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", getpid());
	while (fgets(line, sizeof(line), stdin)) {
		long n;
		if (sscanf(line, "calls %ld", &n) == 1) {
			struct timespec a, b;
			clock_gettime(CLOCK_MONOTONIC, &a);
			for (long i = 0; i < n; i++) {
				if (i % 2 == 0)
					SSL_write(ssl, "x", 1);
				else
					SSL_read(ssl, buf, sizeof(buf));
			}
			clock_gettime(CLOCK_MONOTONIC, &b);
			printf("done %.1f\n", n ? ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (double)n : 0.0);
		} else if (!strcmp(line, "fork\n")) {
			pid_t c = fork();
			if (c == 0) {
				printf("child %d\n", getpid());
				continue;
			}
			waitpid(c, NULL, 0);
		} else if (!strcmp(line, "texec\n")) {
			pthread_t th;
			pthread_create(&th, NULL, reexec, NULL);
			pthread_join(th, NULL); /* never returns: the exec ends this thread */
		} else if (!strcmp(line, "exit\n")) {
			return 0;
		}
	}
	return 0;
}

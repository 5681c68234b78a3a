/* OpenSSL's read and write entry points as thin wrappers of internal
 * functions, for TestOpenSSLInternalFunctions (built as a shared library
 * with clang in variants):
 *   default      OpenSSL 1.1.1 - 3.2: ssl_write_internal(s, buf, num, &written)
 *   -DFLAGS33    3.3 and later: ssl_write_internal(s, buf, num, flags, &written),
 *                SSL_write_ex through the exported SSL_write_ex2
 *   -DNESTED     SSL_read_ex and SSL_write_ex call SSL_read and SSL_write
 *                (no internal function in common)
 *   -DLEAF       the internal functions are leaves that push nothing */
#include <stddef.h>
#include <stdint.h>

int io(void *s, void *buf, size_t num, size_t *done);

#ifdef LEAF
#define BODY(s, buf, num, done) \
	do {                    \
		*(done) = (num);  \
		return 1;         \
	} while (0)
#else
#define BODY(s, buf, num, done)                       \
	do {                                          \
		int r = io(s, buf, num, done);        \
		if (r <= 0)                           \
			r = io(s, buf, num / 2, done); \
		return r + io(s, buf, 0, done);       \
	} while (0)
#endif

/* Internal: hidden, not static (as OpenSSL's, called from several files),
 * so that the compiler keeps their arguments. */
#define INTERNAL __attribute__((noinline, visibility("hidden")))

INTERNAL int ssl_read_internal(void *s, void *buf, size_t num, size_t *readbytes)
{
	BODY(s, buf, num, readbytes);
}

#ifdef FLAGS33
INTERNAL int ssl_write_internal(void *s, const void *buf, size_t num, uint64_t flags, size_t *written)
{
	BODY(s, (void *)buf, num + flags, written);
}
#else
INTERNAL int ssl_write_internal(void *s, const void *buf, size_t num, size_t *written)
{
	BODY(s, (void *)buf, num, written);
}
#endif

#ifdef NESTED
int SSL_read(void *s, void *buf, int num)
{
	size_t n;
	if (num < 0)
		return -1;
	int r = io(s, buf, (size_t)num, &n);
	return r > 0 ? (int)n : r;
}
int SSL_read_ex(void *s, void *buf, size_t num, size_t *readbytes)
{
	int r = SSL_read(s, buf, (int)num);
	if (r <= 0)
		return 0;
	*readbytes = r;
	return 1;
}
int SSL_write(void *s, const void *buf, int num)
{
	size_t n;
	int r = io(s, (void *)buf, (size_t)num, &n);
	return r > 0 ? (int)n : r;
}
int SSL_write_ex(void *s, const void *buf, size_t num, size_t *written)
{
	int r = SSL_write(s, buf, (int)num);
	if (r <= 0)
		return 0;
	*written = r;
	return 1;
}
#else
int SSL_read(void *s, void *buf, int num)
{
	size_t readbytes;
	if (num < 0)
		return -1;
	int ret = ssl_read_internal(s, buf, (size_t)num, &readbytes);
	if (ret > 0)
		ret = (int)readbytes;
	return ret;
}

int SSL_read_ex(void *s, void *buf, size_t num, size_t *readbytes)
{
	int ret = ssl_read_internal(s, buf, num, readbytes);
	if (ret < 0)
		ret = 0;
	return ret;
}

int SSL_write(void *s, const void *buf, int num)
{
	size_t written;
	if (num < 0)
		return -1;
#ifdef FLAGS33
	int ret = ssl_write_internal(s, buf, (size_t)num, 0, &written);
#else
	int ret = ssl_write_internal(s, buf, (size_t)num, &written);
#endif
	if (ret > 0)
		ret = (int)written;
	return ret;
}

#ifdef FLAGS33
__attribute__((noinline)) int SSL_write_ex2(void *s, const void *buf, size_t num, uint64_t flags, size_t *written)
{
	int ret = ssl_write_internal(s, buf, num, flags, written);
	if (ret < 0)
		ret = 0;
	return ret;
}

int SSL_write_ex(void *s, const void *buf, size_t num, size_t *written)
{
	return SSL_write_ex2(s, buf, num, 0, written);
}
#else
int SSL_write_ex(void *s, const void *buf, size_t num, size_t *written)
{
	int ret = ssl_write_internal(s, buf, num, written);
	if (ret < 0)
		ret = 0;
	return ret;
}
#endif
#endif

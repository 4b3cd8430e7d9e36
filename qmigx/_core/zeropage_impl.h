/* Zero-buffer tests for qmigx._core.zeropage.
 *
 * Three implementations of one predicate ("are all n bytes zero?"):
 * a portable one on 64-bit words, and SSE2 / AVX2 ones compiled with
 * per-function target attributes so that the module itself is built
 * without machine-specific flags and the path is picked at run time.
 *
 * Every implementation first looks at the first, last and middle word,
 * because a page that is not zero almost always shows it there; only
 * then is the whole buffer scanned, in blocks that are OR-ed together
 * and tested once per block.  The tail is handled by one overlapping
 * block that ends exactly at the end of the buffer, so no load ever
 * reaches past p + n.
 */
#ifndef QMIGX_ZEROPAGE_IMPL_H
#define QMIGX_ZEROPAGE_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__x86_64__) || defined(__i386__))
#define QMX_X86 1
#include <immintrin.h>
#else
#define QMX_X86 0
#endif

enum {
    QMX_PATH_PORTABLE = 0,
    QMX_PATH_SSE2 = 1,
    QMX_PATH_AVX2 = 2,
};

typedef int (*qmx_zero_fn)(const unsigned char *p, size_t n);

static inline uint64_t qmx_ld64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* Non-zero if a quick look at the first, middle and last word already
 * proves the buffer is not zero.  Requires n >= 8. */
static inline int qmx_quick_nonzero(const unsigned char *p, size_t n)
{
    return (qmx_ld64(p) | qmx_ld64(p + n - 8) |
            qmx_ld64(p + ((n >> 1) & ~(size_t)7))) != 0;
}

static int qmx_zero_small(const unsigned char *p, size_t n)
{
    unsigned char acc = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        acc |= p[i];
    }
    return acc == 0;
}

static int qmx_zero_portable(const unsigned char *p, size_t n)
{
    size_t i;
    if (n < 8) {
        return qmx_zero_small(p, n);
    }
    if (qmx_quick_nonzero(p, n)) {
        return 0;
    }
    for (i = 0; i + 64 <= n; i += 64) {
        uint64_t acc = qmx_ld64(p + i) | qmx_ld64(p + i + 8) |
                       qmx_ld64(p + i + 16) | qmx_ld64(p + i + 24) |
                       qmx_ld64(p + i + 32) | qmx_ld64(p + i + 40) |
                       qmx_ld64(p + i + 48) | qmx_ld64(p + i + 56);
        if (acc) {
            return 0;
        }
    }
    for (; i + 8 <= n; i += 8) {
        if (qmx_ld64(p + i)) {
            return 0;
        }
    }
    /* the last 0..7 bytes lie inside the last word, already tested */
    return 1;
}

#if QMX_X86

__attribute__((target("sse2")))
static int qmx_zero_sse2(const unsigned char *p, size_t n)
{
    const __m128i zero = _mm_setzero_si128();
    size_t i;
    __m128i acc;
    if (n < 64) {
        return qmx_zero_portable(p, n);
    }
    if (qmx_quick_nonzero(p, n)) {
        return 0;
    }
    for (i = 0; i + 64 <= n; i += 64) {
        acc = _mm_or_si128(
            _mm_or_si128(_mm_loadu_si128((const __m128i *)(p + i)),
                         _mm_loadu_si128((const __m128i *)(p + i + 16))),
            _mm_or_si128(_mm_loadu_si128((const __m128i *)(p + i + 32)),
                         _mm_loadu_si128((const __m128i *)(p + i + 48))));
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(acc, zero)) != 0xFFFF) {
            return 0;
        }
    }
    if (i < n) {
        const unsigned char *q = p + n - 64;
        acc = _mm_or_si128(
            _mm_or_si128(_mm_loadu_si128((const __m128i *)q),
                         _mm_loadu_si128((const __m128i *)(q + 16))),
            _mm_or_si128(_mm_loadu_si128((const __m128i *)(q + 32)),
                         _mm_loadu_si128((const __m128i *)(q + 48))));
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(acc, zero)) != 0xFFFF) {
            return 0;
        }
    }
    return 1;
}

#define QMX_LD256(a) _mm256_loadu_si256((const __m256i *)(a))

__attribute__((target("avx2")))
static int qmx_zero_avx2(const unsigned char *p, size_t n)
{
    size_t i;
    __m256i acc;
    if (n < 128) {
        return qmx_zero_sse2(p, n);
    }
    if (qmx_quick_nonzero(p, n)) {
        return 0;
    }
    for (i = 0; i + 256 <= n; i += 256) {
        const unsigned char *q = p + i;
        acc = _mm256_or_si256(
            _mm256_or_si256(_mm256_or_si256(QMX_LD256(q), QMX_LD256(q + 32)),
                            _mm256_or_si256(QMX_LD256(q + 64), QMX_LD256(q + 96))),
            _mm256_or_si256(_mm256_or_si256(QMX_LD256(q + 128), QMX_LD256(q + 160)),
                            _mm256_or_si256(QMX_LD256(q + 192), QMX_LD256(q + 224))));
        if (!_mm256_testz_si256(acc, acc)) {
            return 0;
        }
    }
    if (i + 128 <= n) {
        const unsigned char *q = p + i;
        acc = _mm256_or_si256(_mm256_or_si256(QMX_LD256(q), QMX_LD256(q + 32)),
                              _mm256_or_si256(QMX_LD256(q + 64), QMX_LD256(q + 96)));
        if (!_mm256_testz_si256(acc, acc)) {
            return 0;
        }
        i += 128;
    }
    if (i < n) {
        const unsigned char *q = p + n - 128;
        acc = _mm256_or_si256(_mm256_or_si256(QMX_LD256(q), QMX_LD256(q + 32)),
                              _mm256_or_si256(QMX_LD256(q + 64), QMX_LD256(q + 96)));
        if (!_mm256_testz_si256(acc, acc)) {
            return 0;
        }
    }
    return 1;
}

#undef QMX_LD256

#endif /* QMX_X86 */

/* 1 if the CPU (and OS) can run the given path. */
static int qmx_path_available(int path)
{
    if (path == QMX_PATH_PORTABLE) {
        return 1;
    }
#if QMX_X86
    __builtin_cpu_init();
    if (path == QMX_PATH_SSE2) {
        return __builtin_cpu_supports("sse2") != 0;
    }
    if (path == QMX_PATH_AVX2) {
        return __builtin_cpu_supports("avx2") != 0;
    }
#endif
    return 0;
}

/* The implementation of a path; the portable one for unknown paths. */
static qmx_zero_fn qmx_zero_fn_for(int path)
{
#if QMX_X86
    if (path == QMX_PATH_AVX2) {
        return qmx_zero_avx2;
    }
    if (path == QMX_PATH_SSE2) {
        return qmx_zero_sse2;
    }
#endif
    (void)path;
    return qmx_zero_portable;
}

/* out[k] = 1 if page k of p[0..len) is zero, else 0; the last page may be
 * shorter than page.  out must have room for ceil(len / page) bytes;
 * page must be > 0. */
static void qmx_zero_map(qmx_zero_fn fn, const unsigned char *p, size_t len,
                         size_t page, unsigned char *out)
{
    size_t off, k = 0;
    for (off = 0; off < len; off += page, k++) {
        size_t n = len - off < page ? len - off : page;
        out[k] = (unsigned char)(fn(p + off, n) != 0);
    }
}

#endif /* QMIGX_ZEROPAGE_IMPL_H */

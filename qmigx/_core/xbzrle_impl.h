/* XBZRLE encoder and decoder for qmigx._core.xbzrle (see xbzrle.md).
 *
 * Encoder, in two phases per page:
 *
 *   1. scan: compare old and new 64 bytes at a time and store one 64-bit
 *      "byte changed" mask per 64-byte window, plus the number of changed
 *      bytes and of changed runs.  Leading identical windows are skipped
 *      with plain vector compares.  This is the only part that touches
 *      `old`, and the only part with SIMD variants (portable 64-bit words,
 *      AVX2, AVX-512BW), picked at run time.
 *   2. emit: walk the masks with count-trailing-zeros to find each run
 *      boundary and write the pairs, with the overflow checks placed
 *      exactly where the byte-wise algorithm (xbzrle.md §3) has them.
 *
 * Pages of any length are encoded, as QEMU's encoder does: a page longer
 * than XBZ_SEG_BYTES goes through both phases one segment at a time (the
 * masks of one segment live on the stack), a run left open at the end of
 * a segment carrying over into the next.  A run longer than XBZ_MAX_RUN
 * (possible from 16 KiB pages on) has no 1- or 2-byte uleb; QEMU's encoder
 * stops on an assertion there, this one returns -1 so that the caller
 * sends the page whole.
 *
 * Every changed run costs at least one byte of zero-run length and one of
 * literal length, so "changed bytes + 2 * runs > dlen" over the segments
 * scanned so far proves the encoding cannot fit and the page is rejected
 * (-1) without writing further: the byte-wise encoder would have hit one
 * of its overflow checks, because it never lets d pass dlen.
 *
 * Decoder: a validation pass over the whole delta (grammar and bounds),
 * then an apply pass that trusts it, so a malformed delta never changes
 * the page.
 *
 * No load or store ever reaches outside the buffers given: vector loads
 * of a final partial window either use AVX-512 masked loads or one
 * window that ends exactly at the end of the page.  The encoder may write
 * scratch bytes into `out` beyond the returned length (literal runs are
 * copied in fixed 32-byte blocks when there is room); the decoder writes
 * exactly the literal bytes.
 */
#ifndef QMIGX_XBZRLE_IMPL_H
#define QMIGX_XBZRLE_IMPL_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__x86_64__) || defined(__i386__))
#define XBZ_X86 1
#include <immintrin.h>
#define XBZ_TARGET_AVX2 __attribute__((target("avx2,popcnt,bmi,bmi2")))
#define XBZ_TARGET_AVX512 \
    __attribute__((target("avx512f,avx512bw,avx2,popcnt,bmi,bmi2")))
#else
#define XBZ_X86 0
#endif

#define XBZ_SEG_BYTES 16384 /* bytes scanned per pass; a multiple of 4096 */
#define XBZ_MAX_RUN 0x3FFF   /* the largest 1- or 2-byte uleb */
#define XBZ_SEG_WINDOWS (XBZ_SEG_BYTES / 64)

enum {
    XBZ_PATH_PORTABLE = 0,
    XBZ_PATH_AVX2 = 1,
    XBZ_PATH_AVX512 = 2,
};

/* Decoder status codes (0 = valid). */
enum {
    XBZ_OK = 0,
    XBZ_E_ZRUN_TRUNCATED = -1,
    XBZ_E_ZRUN_ULEB = -2,
    XBZ_E_ZRUN_ZERO = -3,
    XBZ_E_ZRUN_PAST_PAGE = -4,
    XBZ_E_NZRUN_TRUNCATED = -5,
    XBZ_E_NZRUN_ULEB = -6,
    XBZ_E_NZRUN_ZERO = -7,
    XBZ_E_LITERAL_PAST_PAGE = -8,
    XBZ_E_LITERAL_PAST_INPUT = -9,
};

typedef struct {
    size_t first;   /* offset of the first changed byte */
    size_t changed; /* number of changed bytes */
    size_t runs;    /* number of maximal runs of changed bytes */
    uint64_t nonzero[XBZ_SEG_WINDOWS / 64]; /* bit w: window w has a change */
} xbz_scan_t;

/* Returns 0 if old == new.  Otherwise fills *st (st->nonzero from the
 * group of the first change on) and masks[w] for every window w whose bit
 * is set in st->nonzero; other entries are not written.  Mask bits past
 * slen are 0. */
typedef int (*xbz_scan_fn)(const uint8_t *old, const uint8_t *cur,
                           size_t slen, uint64_t *masks, xbz_scan_t *st);

/* ------------------------------------------------------------------ */
/* Bit helpers                                                         */

static inline unsigned xbz_ctz(uint64_t x)
{
    return (unsigned)__builtin_ctzll(x);
}

/* Little-endian value of 8 bytes, whatever the host order, so that bit
 * 8k..8k+7 is byte k. */
static inline uint64_t xbz_ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* One bit per byte of x: bit k set iff byte k of x is non-zero. */
static inline unsigned xbz_nonzero_bytes8(uint64_t x)
{
    const uint64_t low7 = 0x7f7f7f7f7f7f7f7fULL;
    uint64_t t = (((x & low7) + low7) | x) & ~low7;
    return (unsigned)(((t >> 7) * 0x0102040810204080ULL) >> 56);
}

/* Changed-byte mask of a window of n <= 64 bytes (bits >= n are 0). */
static inline uint64_t xbz_mask_portable(const uint8_t *a, const uint8_t *b,
                                         size_t n)
{
    uint64_t m = 0;
    size_t k = 0;
    for (; k + 8 <= n; k += 8) {
        m |= (uint64_t)xbz_nonzero_bytes8(xbz_ld64(a + k) ^ xbz_ld64(b + k))
             << k;
    }
    for (; k < n; k++) {
        m |= (uint64_t)(a[k] != b[k]) << k;
    }
    return m;
}

/* Per-window bookkeeping of a scan: store the mask, note the window as
 * changed, count changed bytes and run starts (a changed byte whose
 * predecessor, possibly the last byte of the previous window, is not). */
typedef struct {
    uint64_t carry; /* last bit of the previous window */
    uint64_t nz;    /* nonzero bits of the current group of 64 windows */
    size_t group, changed, runs;
} xbz_acc_t;

static inline void xbz_acc_add(xbz_acc_t *acc, xbz_scan_t *st,
                               uint64_t *masks, size_t w, uint64_t m)
{
    masks[w] = m;
    if ((w >> 6) != acc->group) {
        st->nonzero[acc->group] = acc->nz;
        acc->group = w >> 6;
        acc->nz = 0;
    }
    acc->nz |= (uint64_t)(m != 0) << (w & 63);
    acc->changed += (size_t)__builtin_popcountll(m);
    acc->runs += (size_t)__builtin_popcountll(m & ~((m << 1) | acc->carry));
    acc->carry = m >> 63;
}

/* The scan skeleton, instantiated once per instruction set so that the
 * window helpers inline.  PAIR_CHANGED(a, b, off): do the 128 bytes at off
 * differ; FULL_MASK(a, b, off): mask of the 64 bytes at off; ANY_MASK(a,
 * b, slen, off): mask of the window at off, which may be partial.  After
 * the first change, pairs of unchanged windows are skipped without
 * bookkeeping (they only end a run, which was counted at its start). */
#define XBZ_DEFINE_SCAN(NAME, ATTR, PAIR_CHANGED, FULL_MASK, ANY_MASK)        \
    ATTR static int NAME(const uint8_t *a, const uint8_t *b, size_t slen,     \
                         uint64_t *masks, xbz_scan_t *st)                     \
    {                                                                         \
        size_t nfull = slen >> 6, nw = (slen + 63) >> 6, w = 0;               \
        uint64_t m0 = 0, m1;                                                  \
        xbz_acc_t acc;                                                        \
        while (w + 2 <= nfull && !PAIR_CHANGED(a, b, w << 6)) {               \
            w += 2;                                                           \
        }                                                                     \
        for (; w < nw; w++) {                                                 \
            m0 = ANY_MASK(a, b, slen, w << 6);                                \
            if (m0) {                                                         \
                break;                                                        \
            }                                                                 \
        }                                                                     \
        if (w == nw) {                                                        \
            return 0;                                                         \
        }                                                                     \
        st->first = (w << 6) + xbz_ctz(m0);                                   \
        memset(st->nonzero, 0, sizeof(st->nonzero));                          \
        acc.carry = 0;                                                        \
        acc.nz = 0;                                                           \
        acc.group = w >> 6;                                                   \
        acc.changed = 0;                                                      \
        acc.runs = 0;                                                         \
        xbz_acc_add(&acc, st, masks, w, m0);                                  \
        for (w++; w + 2 <= nfull; w += 2) {                                   \
            m0 = FULL_MASK(a, b, w << 6);                                     \
            m1 = FULL_MASK(a, b, (w + 1) << 6);                               \
            if (!(m0 | m1)) {                                                 \
                acc.carry = 0;                                                \
                continue;                                                     \
            }                                                                 \
            xbz_acc_add(&acc, st, masks, w, m0);                              \
            xbz_acc_add(&acc, st, masks, w + 1, m1);                          \
        }                                                                     \
        for (; w < nw; w++) {                                                 \
            xbz_acc_add(&acc, st, masks, w, ANY_MASK(a, b, slen, w << 6));    \
        }                                                                     \
        st->nonzero[acc.group] = acc.nz;                                      \
        st->changed = acc.changed;                                            \
        st->runs = acc.runs;                                                  \
        return 1;                                                             \
    }

/* ------------------------------------------------------------------ */
/* Phase 1: scans                                                      */

static inline int xbz_pair_changed_portable(const uint8_t *a,
                                            const uint8_t *b, size_t off)
{
    uint64_t x = 0;
    size_t k;
    for (k = 0; k < 128; k += 8) {
        x |= xbz_ld64(a + off + k) ^ xbz_ld64(b + off + k);
    }
    return x != 0;
}

static inline uint64_t xbz_full_mask_portable(const uint8_t *a,
                                              const uint8_t *b, size_t off)
{
    return xbz_mask_portable(a + off, b + off, 64);
}

static inline uint64_t xbz_any_mask_portable(const uint8_t *a,
                                             const uint8_t *b, size_t slen,
                                             size_t off)
{
    return xbz_mask_portable(a + off, b + off,
                             slen - off < 64 ? slen - off : 64);
}

XBZ_DEFINE_SCAN(xbz_scan_portable, , xbz_pair_changed_portable,
                xbz_full_mask_portable, xbz_any_mask_portable)

#if XBZ_X86

XBZ_TARGET_AVX2 static inline int xbz_pair_changed_avx2(const uint8_t *a,
                                                         const uint8_t *b,
                                                         size_t off)
{
    const __m256i *pa = (const __m256i *)(a + off);
    const __m256i *pb = (const __m256i *)(b + off);
    __m256i x = _mm256_or_si256(
        _mm256_or_si256(_mm256_xor_si256(_mm256_loadu_si256(pa),
                                         _mm256_loadu_si256(pb)),
                        _mm256_xor_si256(_mm256_loadu_si256(pa + 1),
                                         _mm256_loadu_si256(pb + 1))),
        _mm256_or_si256(_mm256_xor_si256(_mm256_loadu_si256(pa + 2),
                                         _mm256_loadu_si256(pb + 2)),
                        _mm256_xor_si256(_mm256_loadu_si256(pa + 3),
                                         _mm256_loadu_si256(pb + 3))));
    return !_mm256_testz_si256(x, x);
}

XBZ_TARGET_AVX2 static inline uint64_t xbz_full_mask_avx2(const uint8_t *a,
                                                           const uint8_t *b,
                                                           size_t off)
{
    const __m256i *pa = (const __m256i *)(a + off);
    const __m256i *pb = (const __m256i *)(b + off);
    __m256i e0 = _mm256_cmpeq_epi8(_mm256_loadu_si256(pa),
                                   _mm256_loadu_si256(pb));
    __m256i e1 = _mm256_cmpeq_epi8(_mm256_loadu_si256(pa + 1),
                                   _mm256_loadu_si256(pb + 1));
    uint64_t eq = (uint32_t)_mm256_movemask_epi8(e0) |
                  ((uint64_t)(uint32_t)_mm256_movemask_epi8(e1) << 32);
    return ~eq;
}

/* A final partial window is read as the 64 bytes that end at slen. */
XBZ_TARGET_AVX2 static inline uint64_t xbz_any_mask_avx2(const uint8_t *a,
                                                          const uint8_t *b,
                                                          size_t slen,
                                                          size_t off)
{
    size_t n = slen - off;
    if (n >= 64) {
        return xbz_full_mask_avx2(a, b, off);
    }
    if (slen >= 64) {
        return xbz_full_mask_avx2(a, b, slen - 64) >> (64 - n);
    }
    return xbz_mask_portable(a + off, b + off, n);
}

XBZ_DEFINE_SCAN(xbz_scan_avx2, XBZ_TARGET_AVX2, xbz_pair_changed_avx2,
                xbz_full_mask_avx2, xbz_any_mask_avx2)

XBZ_TARGET_AVX512 static inline uint64_t xbz_full_mask_avx512(
    const uint8_t *a, const uint8_t *b, size_t off)
{
    return _mm512_cmpneq_epi8_mask(_mm512_loadu_si512(a + off),
                                   _mm512_loadu_si512(b + off));
}

XBZ_TARGET_AVX512 static inline int xbz_pair_changed_avx512(
    const uint8_t *a, const uint8_t *b, size_t off)
{
    return (xbz_full_mask_avx512(a, b, off) |
            xbz_full_mask_avx512(a, b, off + 64)) != 0;
}

/* A final partial window uses masked loads: masked-off bytes are neither
 * read nor able to fault. */
XBZ_TARGET_AVX512 static inline uint64_t xbz_any_mask_avx512(
    const uint8_t *a, const uint8_t *b, size_t slen, size_t off)
{
    size_t n = slen - off;
    if (n >= 64) {
        return xbz_full_mask_avx512(a, b, off);
    }
    __mmask64 k = _bzhi_u64(~0ULL, (unsigned)n);
    return _mm512_mask_cmpneq_epi8_mask(k, _mm512_maskz_loadu_epi8(k, a + off),
                                        _mm512_maskz_loadu_epi8(k, b + off));
}

XBZ_DEFINE_SCAN(xbz_scan_avx512, XBZ_TARGET_AVX512, xbz_pair_changed_avx512,
                xbz_full_mask_avx512, xbz_any_mask_avx512)

#endif /* XBZ_X86 */

static int xbz_path_available(int path)
{
#if XBZ_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("popcnt") &&
               __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    switch (path) {
    case XBZ_PATH_PORTABLE:
        return 1;
    case XBZ_PATH_AVX2:
        return avx2;
    case XBZ_PATH_AVX512:
        return avx2 && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw");
    default:
        return 0;
    }
#else
    return path == XBZ_PATH_PORTABLE;
#endif
}

static xbz_scan_fn xbz_scan_for(int path)
{
#if XBZ_X86
    if (path == XBZ_PATH_AVX512) {
        return xbz_scan_avx512;
    }
    if (path == XBZ_PATH_AVX2) {
        return xbz_scan_avx2;
    }
#endif
    (void)path;
    return xbz_scan_portable;
}

/* ------------------------------------------------------------------ */
/* Phase 2: emit                                                       */

/* Writes the uleb of v <= 0x3FFF as two bytes (the second is scratch when
 * v < 0x80) and returns its real size; the caller guarantees 2 bytes of
 * room. */
static inline size_t xbz_put_uleb(uint8_t *p, size_t v)
{
    size_t big = v >= 0x80;
    p[0] = (uint8_t)((v & 0x7f) | (big << 7));
    p[1] = (uint8_t)(v >> 7);
    return 1 + big;
}

/* xbz_emit with every overflow check of the byte-wise encoder, in its
 * order. */
static int xbz_emit_slow(const uint8_t *cur, uint8_t *out, size_t dlen,
                         size_t *dp, size_t zrun, size_t start, size_t m)
{
    size_t d = *dp;
    if (d + 2 > dlen) {
        return -1; /* top of the pair */
    }
    if (zrun > XBZ_MAX_RUN) {
        return -1; /* not representable */
    }
    d += xbz_put_uleb(out + d, zrun);
    if (d + 2 > dlen) {
        return -1;
    }
    if (m > XBZ_MAX_RUN) {
        return -1; /* not representable */
    }
    d += xbz_put_uleb(out + d, m);
    if (d + m > dlen) {
        return -1;
    }
    memcpy(out + d, cur + start, m);
    *dp = d + m;
    return 0;
}

/* Appends one pair (zero run, literal run [start, end)) at *dp; returns 0,
 * or -1 on overflow.  The common case, a short run with room to spare so
 * that no check can fire, takes one branch and a fixed 32-byte copy. */
static inline int xbz_emit(const uint8_t *cur, size_t slen, uint8_t *out,
                           size_t dlen, size_t *dp, size_t zrun,
                           size_t start, size_t end)
{
    size_t d = *dp, m = end - start;
    if (m <= 32 && zrun <= XBZ_MAX_RUN && d + 4 + 32 <= dlen &&
        start + 32 <= slen) {
        d += xbz_put_uleb(out + d, zrun);
        d += xbz_put_uleb(out + d, m);
        memcpy(out + d, cur + start, 32);
        *dp = d + m;
        return 0;
    }
    return xbz_emit_slow(cur, out, dlen, dp, zrun, start, m);
}

/* QEMU's encode result for one page: encoded length, 0 (unchanged) or -1
 * (does not fit in dlen, or holds a run longer than XBZ_MAX_RUN).  Any
 * slen; an empty page is unchanged whatever dlen, as QEMU's loop over the
 * page never runs.
 *
 * The emit phase visits the windows that have changes.  In each, the run
 * starts are the changed bits whose predecessor is unchanged and the run
 * ends the unchanged bits whose predecessor changed.  Starts and ends
 * alternate, beginning with an end when a run is still open from the
 * previous window (exactly when that window's last bit is set), so taking
 * the lowest remaining bit of each in turn yields the pairs in order.
 * Window numbers are page-wide, so a run open at the end of one segment
 * continues into the next exactly as it does between two windows. */
static inline int xbz_encode(xbz_scan_fn scan, const uint8_t *old,
                             const uint8_t *cur, size_t slen, uint8_t *out,
                             size_t dlen)
{
    uint64_t masks[XBZ_SEG_WINDOWS];
    xbz_scan_t st;
    size_t nw = (slen + 63) >> 6, g, d = 0, prev_end = 0, start = 0;
    size_t next_w = 0; /* the window after the last one visited */
    uint64_t open = 0;  /* a run is open at the end of that window */
    size_t seg, changed = 0, runs = 0;
    int any = 0;

    if (slen == 0) {
        return 0;
    }
    if (dlen > INT_MAX) {
        dlen = INT_MAX; /* QEMU's capacity is an int */
    }
    if (dlen < 2) {
        return -1; /* the check at the top of the first pair */
    }
    for (seg = 0; seg < slen; seg += XBZ_SEG_BYTES) {
        size_t seglen = slen - seg < XBZ_SEG_BYTES ? slen - seg : XBZ_SEG_BYTES;
        size_t w0 = seg >> 6, snw = (seglen + 63) >> 6;
        if (!scan(old + seg, cur + seg, seglen, masks, &st)) {
            continue;
        }
        any = 1;
        /* a run open at the end of the previous segment and going on here
         * was counted there already */
        runs += st.runs - (size_t)(open && next_w == w0 && st.first == 0);
        changed += st.changed;
        if (changed + 2 * runs > dlen) {
            return -1;
        }
        for (g = st.first >> 12; g <= (snw - 1) >> 6; g++) {
            uint64_t windows = st.nonzero[g];
            while (windows) {
                size_t lw = (g << 6) + xbz_ctz(windows);
                size_t w = w0 + lw, base = w << 6;
                windows &= windows - 1;
                if (w != next_w && open) {
                    /* the open run ends where the unchanged window after it
                     * starts */
                    if (xbz_emit(cur, slen, out, dlen, &d, start - prev_end,
                                 start, next_w << 6)) {
                        return -1;
                    }
                    prev_end = next_w << 6;
                    open = 0;
                }
                uint64_t m = masks[lw], shifted = (m << 1) | open;
                uint64_t starts = m & ~shifted, ends = ~m & shifted;
                for (;;) {
                    if (!open) {
                        if (!starts) {
                            break;
                        }
                        start = base + xbz_ctz(starts);
                        starts &= starts - 1;
                        open = 1;
                    }
                    if (!ends) {
                        break;
                    }
                    size_t end = base + xbz_ctz(ends);
                    ends &= ends - 1;
                    open = 0;
                    if (xbz_emit(cur, slen, out, dlen, &d, start - prev_end,
                                 start, end)) {
                        return -1;
                    }
                    prev_end = end;
                }
                next_w = w + 1;
            }
        }
    }
    if (!any) {
        return 0;
    }
    if (open) {
        size_t end = next_w < nw ? next_w << 6 : slen;
        if (xbz_emit(cur, slen, out, dlen, &d, start - prev_end, start, end)) {
            return -1;
        }
        prev_end = end;
    }
    if (prev_end < slen && d + 2 > dlen) {
        return -1; /* the top check before the unencoded trailing run */
    }
    return (int)d;
}

static void xbz_encode_pages(xbz_scan_fn scan, const uint8_t *old,
                             const uint8_t *cur, size_t n, size_t slen,
                             uint8_t *out, size_t dlen, int32_t *lengths)
{
    size_t k;
    for (k = 0; k < n; k++) {
        lengths[k] = xbz_encode(scan, old + k * slen, cur + k * slen, slen,
                                out + k * dlen, dlen);
    }
}

/* ------------------------------------------------------------------ */
/* Benchmark baseline                                                  */

/* The byte-wise algorithm of xbzrle.md §3 with the 8-bytes-at-a-time
 * scanning the spec describes for QEMU: plain 64-bit compares while
 * unchanged and the "word has a zero byte" test on the XOR while changed,
 * bytes one at a time up to the 8-byte grid and inside the final word.
 * Not used by qmigx itself: benchmarks measure the kernel against it in
 * the same run, which says more than figures taken on another machine. */
static int xbz_encode_baseline(const uint8_t *old, const uint8_t *cur,
                               size_t slen, uint8_t *out, size_t dlen)
{
    const uint64_t ones = 0x0101010101010101ULL;
    size_t d = 0, i = 0, z, m, start, unaligned;

    if (dlen > INT_MAX) {
        dlen = INT_MAX;
    }
    while (i < slen) {
        if (d + 2 > dlen) {
            return -1;
        }
        z = 0;
        unaligned = (slen - i) & 7;
        while (unaligned && old[i] == cur[i]) {
            z++, i++, unaligned--;
        }
        if (!unaligned) {
            while (i < slen && xbz_ld64(old + i) == xbz_ld64(cur + i)) {
                z += 8, i += 8;
            }
            while (i < slen && old[i] == cur[i]) {
                z++, i++;
            }
        }
        if (z == slen) {
            return 0;
        }
        if (i == slen) {
            return (int)d;
        }
        if (z > XBZ_MAX_RUN) {
            return -1;
        }
        d += xbz_put_uleb(out + d, z);
        if (d + 2 > dlen) {
            return -1;
        }
        start = i;
        unaligned = (slen - i) & 7;
        while (unaligned && old[i] != cur[i]) {
            i++, unaligned--;
        }
        if (!unaligned) {
            while (i < slen) {
                uint64_t x = xbz_ld64(old + i) ^ xbz_ld64(cur + i);
                if ((x - ones) & ~x & (ones << 7)) {
                    while (old[i] != cur[i]) {
                        i++;
                    }
                    break;
                }
                i += 8;
            }
        }
        m = i - start;
        if (m > XBZ_MAX_RUN) {
            return -1;
        }
        d += xbz_put_uleb(out + d, m);
        if (d + m > dlen) {
            return -1;
        }
        memcpy(out + d, cur + start, m);
        d += m;
    }
    return (int)d;
}

static void xbz_encode_pages_baseline(const uint8_t *old, const uint8_t *cur,
                                      size_t n, size_t slen, uint8_t *out,
                                      size_t dlen, int32_t *lengths)
{
    size_t k;
    for (k = 0; k < n; k++) {
        lengths[k] = xbz_encode_baseline(old + k * slen, cur + k * slen, slen,
                                         out + k * dlen, dlen);
    }
}

/* ------------------------------------------------------------------ */
/* Decoder                                                             */

/* Reads a uleb at p (two bytes readable); returns its size or -1. */
static inline int xbz_get_uleb(const uint8_t *p, size_t *v)
{
    if (p[0] < 0x80) {
        *v = p[0];
        return 1;
    }
    if (p[1] & 0x80) {
        return -1;
    }
    *v = (size_t)(p[0] & 0x7f) | ((size_t)p[1] << 7);
    return 2;
}

/* Validates a whole delta against a page of dlen bytes.  Returns XBZ_OK
 * and the final output position in *dend, or an error code and the
 * offending offset in src in *where.
 *
 * The common pair (two 1-byte lengths, in bounds) is accepted with one
 * combined test; anything else goes through the checks one by one, in the
 * order of xbzrle.md §4, which also decides which error is reported. */
static int xbz_check(const uint8_t *src, size_t slen, size_t dlen,
                     size_t *where, size_t *dend)
{
    size_t i = 0, d = 0, z, m;
    int n, rc;

    while (i < slen) {
        if (slen - i >= 2 && (src[i] | src[i + 1]) < 0x80) {
            z = src[i];
            m = src[i + 1];
            if ((z != 0 || i == 0) && m != 0 && d + z + m <= dlen &&
                m <= slen - i - 2) {
                i += 2 + m;
                d += z + m;
                continue;
            }
        }
        if (slen - i < 2) {
            rc = XBZ_E_ZRUN_TRUNCATED;
            goto fail;
        }
        n = xbz_get_uleb(src + i, &z);
        if (n < 0) {
            rc = XBZ_E_ZRUN_ULEB;
            goto fail;
        }
        if (i != 0 && z == 0) {
            rc = XBZ_E_ZRUN_ZERO;
            goto fail;
        }
        if (d + z > dlen) {
            rc = XBZ_E_ZRUN_PAST_PAGE;
            goto fail;
        }
        i += (size_t)n;
        d += z;
        if (slen - i < 2) {
            rc = XBZ_E_NZRUN_TRUNCATED;
            goto fail;
        }
        n = xbz_get_uleb(src + i, &m);
        if (n < 0) {
            rc = XBZ_E_NZRUN_ULEB;
            goto fail;
        }
        if (m == 0) {
            rc = XBZ_E_NZRUN_ZERO;
            goto fail;
        }
        i += (size_t)n;
        if (d + m > dlen) {
            rc = XBZ_E_LITERAL_PAST_PAGE;
            goto fail;
        }
        if (m > slen - i) {
            rc = XBZ_E_LITERAL_PAST_INPUT;
            goto fail;
        }
        i += m;
        d += m;
    }
    *dend = d;
    return XBZ_OK;
fail:
    *where = i;
    return rc;
}

/* Copies exactly m >= 1 bytes with a few overlapping fixed-size moves. */
static inline void xbz_copy_exact(uint8_t *d, const uint8_t *s, size_t m)
{
    if (m >= 16) {
        if (m <= 32) {
            memcpy(d, s, 16);
            memcpy(d + m - 16, s + m - 16, 16);
        } else {
            memcpy(d, s, m);
        }
    } else if (m >= 8) {
        memcpy(d, s, 8);
        memcpy(d + m - 8, s + m - 8, 8);
    } else if (m >= 4) {
        memcpy(d, s, 4);
        memcpy(d + m - 4, s + m - 4, 4);
    } else {
        d[0] = s[0];
        d[m >> 1] = s[m >> 1];
        d[m - 1] = s[m - 1];
    }
}

/* Applies a delta that xbz_check accepted. */
static void xbz_apply(const uint8_t *src, size_t slen, uint8_t *dst)
{
    size_t i = 0, d = 0, z = 0, m = 0;
    while (i < slen) {
        if ((src[i] | src[i + 1]) < 0x80) {
            d += src[i];
            m = src[i + 1];
            i += 2;
        } else {
            i += (size_t)xbz_get_uleb(src + i, &z);
            d += z;
            i += (size_t)xbz_get_uleb(src + i, &m);
        }
        xbz_copy_exact(dst + d, src + i, m);
        d += m;
        i += m;
    }
}

/* Validates every delta, then applies them all.  On failure returns the
 * error code with the page index and offset, and no page is modified. */
static int xbz_decode_pages(const uint8_t *deltas, size_t dstride,
                            const int32_t *lengths, uint8_t *pages,
                            size_t psize, size_t n, size_t *bad_page,
                            size_t *where)
{
    size_t k, dend;
    int rc;
    for (k = 0; k < n; k++) {
        if (lengths[k] > 0) {
            rc = xbz_check(deltas + k * dstride, (size_t)lengths[k], psize,
                           where, &dend);
            if (rc != XBZ_OK) {
                *bad_page = k;
                return rc;
            }
        }
    }
    for (k = 0; k < n; k++) {
        if (lengths[k] > 0) {
            xbz_apply(deltas + k * dstride, (size_t)lengths[k],
                      pages + k * psize);
        }
    }
    return XBZ_OK;
}

#endif /* QMIGX_XBZRLE_IMPL_H */

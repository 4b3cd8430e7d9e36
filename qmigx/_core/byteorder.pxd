# cython: language_level=3
"""The wire's big-endian be32/be64 fields, loaded and stored by compiled loops.

(And little-endian 64-bit words, which the page digest reads.)

Through memcpy, so unaligned addresses are safe, and compiled to one move
plus a byte swap (none on a big-endian host) instead of eight byte moves.
"""

from libc.stdint cimport uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    #define QMIGX_BE32(x) __builtin_bswap32(x)
    #define QMIGX_BE64(x) __builtin_bswap64(x)
    #define QMIGX_LE64(x) (x)
    #elif defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define QMIGX_BE32(x) (x)
    #define QMIGX_BE64(x) (x)
    #define QMIGX_LE64(x) __builtin_bswap64(x)
    #else
    static inline uint32_t QMIGX_BE32(uint32_t x) {
        const unsigned char *b = (const unsigned char *)&x;
        return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
    }
    static inline uint64_t QMIGX_BE64(uint64_t x) {
        const unsigned char *b = (const unsigned char *)&x;
        return ((uint64_t)QMIGX_BE32(*(const uint32_t *)b) << 32) | QMIGX_BE32(*(const uint32_t *)(b + 4));
    }
    static inline uint64_t QMIGX_LE64(uint64_t x) {
        const unsigned char *b = (const unsigned char *)&x;
        uint64_t v = 0;
        for (int i = 7; i >= 0; i--) v = (v << 8) | b[i];
        return v;
    }
    #endif
    static inline uint32_t qmigx_load_be32(const unsigned char *p) {
        uint32_t v; memcpy(&v, p, 4); return QMIGX_BE32(v);
    }
    static inline uint64_t qmigx_load_be64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8); return QMIGX_BE64(v);
    }
    static inline uint64_t qmigx_load_le64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8); return QMIGX_LE64(v);
    }
    static inline void qmigx_store_be32(unsigned char *p, uint32_t v) {
        v = QMIGX_BE32(v); memcpy(p, &v, 4);
    }
    static inline void qmigx_store_be64(unsigned char *p, uint64_t v) {
        v = QMIGX_BE64(v); memcpy(p, &v, 8);
    }
    """
    uint32_t load_be32 "qmigx_load_be32"(const unsigned char* p) noexcept nogil
    uint64_t load_be64 "qmigx_load_be64"(const unsigned char* p) noexcept nogil
    uint64_t load_le64 "qmigx_load_le64"(const unsigned char* p) noexcept nogil
    void store_be32 "qmigx_store_be32"(unsigned char* p, uint32_t v) noexcept nogil
    void store_be64 "qmigx_store_be64"(unsigned char* p, uint64_t v) noexcept nogil

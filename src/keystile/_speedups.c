/*
 * keystile._speedups: the cache-hit path in C.
 *
 * One Table holds what a cache hit reads: the 8-byte tag and the full 32-byte keyed
 * BLAKE2b digest of every cached key, when it was last used, and its entry (a Python
 * object). Table.hit() takes an ASGI header list and does in one call what the
 * pure-Python path does in three (keystile.credentials.split_credential, the keyed
 * digest, the tag scan), and declines (returns None) whenever the request is not a
 * plain hit, so that Python decides everything unusual.
 *
 * Constant time is the point:
 *   - the tag scan reads every tag and has no data-dependent branch: matches are
 *     OR-accumulated into masks, the first and last matching index are selected with
 *     masks (scan_avx2, scan_sse2, scan_scalar; docs/architecture.md shows how to check
 *     the built object's disassembly, tests/speedups/test_speedups_asm.py does it);
 *   - both candidates (first and last match, or a dummy) are always compared on their
 *     full 32 bytes, without early exit (ct_equal32).
 *
 * BLAKE2b (RFC 7693) is written here from the RFC; the key block is compressed once
 * per table, so a digest costs one compression for any token up to 128 bytes.
 *
 * Python code may run inside any call that allocates an object (up to Python 3.11 the
 * collector runs there, and with it any garbage's finalizer) or drops a reference (the
 * freed object's finalizer), and that code may use this table. So no slot or borrowed
 * pointer is kept across such a call: a method changes the table first and drops
 * references last, and hit() re-checks the table's version and the header list after
 * allocating its answer (tests/speedups/test_speedups_reentry.py).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define KS_X86 1
#include <immintrin.h>
#else
#define KS_X86 0
#endif

#define KS_EXPORT __attribute__((noinline, visibility("hidden")))

#define DIGEST_SIZE 32
#define BLOCK_SIZE 128
#define MAX_CREDENTIAL_HEADERS 8

/* -- BLAKE2b (RFC 7693) ------------------------------------------------------------ */

static const uint64_t blake2b_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64_le(const uint8_t *p)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
#else
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
#endif
}

static inline void store64_le(uint8_t *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(p, &v, 8);
#else
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
#endif
}

#define G(a, b, c, d, x, y)              \
    do {                                 \
        a = a + b + (x);                 \
        d = rotr64(d ^ a, 32);           \
        c = c + d;                       \
        b = rotr64(b ^ c, 24);           \
        a = a + b + (y);                 \
        d = rotr64(d ^ a, 16);           \
        c = c + d;                       \
        b = rotr64(b ^ c, 63);           \
    } while (0)

static void blake2b_compress(uint64_t h[8], const uint8_t block[BLOCK_SIZE], uint64_t t,
                             int last)
{
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = load64_le(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = blake2b_iv[i];
    }
    v[12] ^= t; /* the counter's high word stays 0: inputs are far below 2^64 bytes */
    if (last)
        v[14] = ~v[14];
    /* Fully unrolled, so the message schedule is constant indexes, not table loads. */
#pragma GCC unroll 12
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = blake2b_sigma[r];
        G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

/* The keyed state: h after the key block (for non-empty messages), and the key block
 * itself (an empty message makes the key block the final one). */
typedef struct {
    uint64_t h_after_key[8];
    uint64_t h_init[8];
    uint8_t key_block[BLOCK_SIZE];
} keyed_blake2b;

static void keyed_init(keyed_blake2b *k, const uint8_t *key, size_t keylen)
{
    for (int i = 0; i < 8; i++)
        k->h_init[i] = blake2b_iv[i];
    k->h_init[0] ^= 0x01010000ULL ^ ((uint64_t)keylen << 8) ^ DIGEST_SIZE;
    memset(k->key_block, 0, BLOCK_SIZE);
    memcpy(k->key_block, key, keylen);
    memcpy(k->h_after_key, k->h_init, sizeof k->h_init);
    blake2b_compress(k->h_after_key, k->key_block, BLOCK_SIZE, 0);
}

static void keyed_digest(const keyed_blake2b *k, const uint8_t *msg, size_t len,
                         uint8_t out[DIGEST_SIZE])
{
    uint64_t h[8];
    uint8_t block[BLOCK_SIZE];
    if (len == 0) {
        memcpy(h, k->h_init, sizeof h);
        blake2b_compress(h, k->key_block, BLOCK_SIZE, 1);
    }
    else {
        uint64_t t = BLOCK_SIZE;
        memcpy(h, k->h_after_key, sizeof h);
        while (len > BLOCK_SIZE) {
            t += BLOCK_SIZE;
            blake2b_compress(h, msg, t, 0);
            msg += BLOCK_SIZE;
            len -= BLOCK_SIZE;
        }
        memset(block, 0, BLOCK_SIZE);
        memcpy(block, msg, len);
        blake2b_compress(h, block, t + len, 1);
    }
    for (int i = 0; i < DIGEST_SIZE / 8; i++)
        store64_le(out + 8 * i, h[i]);
}

/* -- the constant-time scan ------------------------------------------------------------
 *
 * Each kernel reads all n tags (the table pads its arrays to a multiple of 8, lanes
 * past n are masked off by index, so there is no tail loop) and returns, through *first and
 * *last, the first and the last index whose tag equals probe, or -1. Matches only ever
 * change masks; the loop's one conditional branch compares the index with n.
 */

typedef void (*scan_fn)(const uint64_t *tags, Py_ssize_t n, uint64_t probe, int64_t *first,
                        int64_t *last);

/* Branch-free helpers: all-ones when the condition holds, else 0. */
static inline uint64_t mask_eq(uint64_t a, uint64_t b)
{
    uint64_t x = a ^ b;
    return ((x | (0 - x)) >> 63) - 1;
}

static inline uint64_t mask_lt(uint64_t a, uint64_t b)
{
    /* a < b for a, b < 2^63 (indexes): the sign of a - b */
    return 0 - ((a - b) >> 63);
}

static inline uint64_t select64(uint64_t mask, uint64_t a, uint64_t b)
{
    return (a & mask) | (b & ~mask);
}

KS_EXPORT void ks_scan_scalar(const uint64_t *tags, Py_ssize_t n, uint64_t probe,
                              int64_t *first, int64_t *last)
{
    uint64_t found = 0, f = 0, l = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t m = mask_eq(tags[i], probe);
        f = select64(m & ~found, (uint64_t)i, f);
        l = select64(m, (uint64_t)i, l);
        found |= m;
    }
    *first = (int64_t)select64(found, f, (uint64_t)-1);
    *last = (int64_t)select64(found, l, (uint64_t)-1);
}

/* Lanes -> one answer: the smallest first and the largest last among lanes that found. */
static inline __attribute__((always_inline)) void reduce_lanes(const uint64_t *found, const uint64_t *f, const uint64_t *l,
                                int lanes, int64_t *first, int64_t *last)
{
    uint64_t any = 0, best_f = (uint64_t)INT64_MAX, best_l = 0;
#pragma GCC unroll 8
    for (int j = 0; j < lanes; j++) {
        uint64_t cf = select64(found[j], f[j], (uint64_t)INT64_MAX);
        uint64_t cl = select64(found[j], l[j], 0);
        best_f = select64(mask_lt(cf, best_f), cf, best_f);
        best_l = select64(mask_lt(best_l, cl), cl, best_l);
        any |= found[j];
    }
    *first = (int64_t)select64(any, best_f, (uint64_t)-1);
    *last = (int64_t)select64(any, best_l, (uint64_t)-1);
}

#if KS_X86
/* 8 tags per iteration into two independent sets of accumulators (the blends of one set
 * do not wait for the other's). The loop covers whole blocks of 8 and blends the block
 * number; the one partial block left (possibly empty) is scanned after it, with lanes past
 * n masked off by index, whatever n is. */
#define KS_AVX2_BLOCK(t0, t1, v0, v1)                                                     \
    do {                                                                                  \
        __m256i m0 = _mm256_and_si256(_mm256_cmpeq_epi64((t0), p), (v0));                 \
        __m256i m1 = _mm256_and_si256(_mm256_cmpeq_epi64((t1), p), (v1));                 \
        /* f follows the block number until a lane has found: then it stays */           \
        f0 = _mm256_blendv_epi8(block, f0, found0);                                       \
        f1 = _mm256_blendv_epi8(block, f1, found1);                                       \
        l0 = _mm256_blendv_epi8(l0, block, m0);                                           \
        l1 = _mm256_blendv_epi8(l1, block, m1);                                           \
        found0 = _mm256_or_si256(found0, m0);                                             \
        found1 = _mm256_or_si256(found1, m1);                                             \
    } while (0)

__attribute__((target("avx2"))) KS_EXPORT void ks_scan_avx2(const uint64_t *tags, Py_ssize_t n,
                                                             uint64_t probe, int64_t *first,
                                                             int64_t *last)
{
    const __m256i p = _mm256_set1_epi64x((long long)probe);
    const __m256i all = _mm256_set1_epi64x(-1);
    const __m256i one = _mm256_set1_epi64x(1);
    __m256i block = _mm256_setzero_si256();
    __m256i found0 = _mm256_setzero_si256(), found1 = _mm256_setzero_si256();
    __m256i f0 = _mm256_setzero_si256(), f1 = _mm256_setzero_si256();
    __m256i l0 = _mm256_setzero_si256(), l1 = _mm256_setzero_si256();
    Py_ssize_t whole = n & ~(Py_ssize_t)7;
    for (Py_ssize_t i = 0; i < whole; i += 8) {
        KS_AVX2_BLOCK(_mm256_load_si256((const __m256i *)(tags + i)),
                      _mm256_load_si256((const __m256i *)(tags + i + 4)), all, all);
        block = _mm256_add_epi64(block, one);
    }
    {
        /* the table keeps at least 8 readable tags past whole (capacity > n, a multiple
         * of 8) */
        const __m256i limit = _mm256_set1_epi64x((long long)(n - whole));
        __m256i valid0 = _mm256_cmpgt_epi64(limit, _mm256_setr_epi64x(0, 1, 2, 3));
        __m256i valid1 = _mm256_cmpgt_epi64(limit, _mm256_setr_epi64x(4, 5, 6, 7));
        KS_AVX2_BLOCK(_mm256_load_si256((const __m256i *)(tags + whole)),
                      _mm256_load_si256((const __m256i *)(tags + whole + 4)), valid0, valid1);
    }
    uint64_t fa[8], la[8], ma[8];
    _mm256_storeu_si256((__m256i *)fa, f0);
    _mm256_storeu_si256((__m256i *)(fa + 4), f1);
    _mm256_storeu_si256((__m256i *)la, l0);
    _mm256_storeu_si256((__m256i *)(la + 4), l1);
    _mm256_storeu_si256((__m256i *)ma, found0);
    _mm256_storeu_si256((__m256i *)(ma + 4), found1);
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) { /* block number -> index */
        fa[j] = fa[j] * 8 + (uint64_t)j;
        la[j] = la[j] * 8 + (uint64_t)j;
    }
    reduce_lanes(ma, fa, la, 8, first, last);
}
#undef KS_AVX2_BLOCK

KS_EXPORT void ks_scan_sse2(const uint64_t *tags, Py_ssize_t n, uint64_t probe, int64_t *first,
                            int64_t *last)
{
    /* SSE2 has no 64-bit compare: a 64-bit lane is equal when both its 32-bit halves are
     * (the halves' masks ANDed with the swapped halves). The index limit is a scalar
     * mask per lane. */
    const __m128i p = _mm_set1_epi64x((long long)probe);
    __m128i found = _mm_setzero_si128();
    __m128i f = _mm_setzero_si128();
    __m128i l = _mm_setzero_si128();
    for (Py_ssize_t i = 0; i < n; i += 2) {
        __m128i t = _mm_load_si128((const __m128i *)(tags + i));
        __m128i e32 = _mm_cmpeq_epi32(t, p);
        __m128i e64 = _mm_and_si128(e32, _mm_shuffle_epi32(e32, _MM_SHUFFLE(2, 3, 0, 1)));
        __m128i valid = _mm_set_epi64x((long long)mask_lt((uint64_t)i + 1, (uint64_t)n),
                                       (long long)mask_lt((uint64_t)i, (uint64_t)n));
        __m128i idx = _mm_set_epi64x((long long)i + 1, (long long)i);
        __m128i m = _mm_and_si128(e64, valid);
        __m128i newf = _mm_andnot_si128(found, m);
        f = _mm_or_si128(_mm_and_si128(newf, idx), _mm_andnot_si128(newf, f));
        l = _mm_or_si128(_mm_and_si128(m, idx), _mm_andnot_si128(m, l));
        found = _mm_or_si128(found, m);
    }
    uint64_t fa[2], la[2], ma[2];
    _mm_storeu_si128((__m128i *)fa, f);
    _mm_storeu_si128((__m128i *)la, l);
    _mm_storeu_si128((__m128i *)ma, found);
    reduce_lanes(ma, fa, la, 2, first, last);
}
#endif

static scan_fn scan_kernel = ks_scan_scalar;
static const char *scan_kernel_name = "scalar";

/* 1 if the 32 bytes are equal, else 0; reads every byte whatever the data. */
KS_EXPORT int ks_equal32(const uint8_t *a, const uint8_t *b)
{
    uint64_t acc = 0;
    for (int i = 0; i < DIGEST_SIZE; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        acc |= x ^ y;
    }
    return (int)(mask_eq(acc, 0) & 1);
}

/* -- the table ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_ssize_t size;
    Py_ssize_t capacity;       /* a multiple of 8; arrays are zero past size */
    uint64_t *tags;            /* 32-byte aligned, for the vector loads */
    uint8_t (*digests)[DIGEST_SIZE];
    double *seen;
    PyObject **entries;        /* strong references, [0, size) */
    uint64_t version;          /* bumped by every change of the entries (see Table_hit) */
    Py_ssize_t max_token;
    keyed_blake2b key;
} Table;

static int table_grow(Table *self, Py_ssize_t capacity)
{
    capacity = (capacity + 7) & ~(Py_ssize_t)7; /* the AVX2 scan reads 8 tags at a time */
    if (capacity <= self->capacity)
        return 0;
    if ((size_t)capacity > PY_SSIZE_T_MAX / DIGEST_SIZE) {
        PyErr_NoMemory();
        return -1;
    }
    /* 8 tags of padding past capacity: the AVX2 scan reads the block after the last
     * whole one even when the table is full (those lanes are masked off). */
    uint64_t *tags = NULL;
    if (posix_memalign((void **)&tags, 32, (size_t)(capacity + 8) * sizeof *tags) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    uint8_t(*digests)[DIGEST_SIZE] = PyMem_RawRealloc(self->digests, (size_t)capacity * DIGEST_SIZE);
    if (digests == NULL) {
        free(tags);
        PyErr_NoMemory();
        return -1;
    }
    self->digests = digests;
    double *seen = PyMem_RawRealloc(self->seen, (size_t)capacity * sizeof *seen);
    if (seen == NULL) {
        free(tags);
        PyErr_NoMemory();
        return -1;
    }
    self->seen = seen;
    PyObject **entries = PyMem_RawRealloc(self->entries, (size_t)capacity * sizeof *entries);
    if (entries == NULL) {
        free(tags);
        PyErr_NoMemory();
        return -1;
    }
    self->entries = entries;
    if (self->size)
        memcpy(tags, self->tags, (size_t)self->size * sizeof *tags);
    /* Past size the tags are masked off by index and the digests never match (the
     * match is masked), but both are read: keep them defined. */
    memset(tags + self->size, 0, (size_t)(capacity + 8 - self->size) * sizeof *tags);
    memset(digests + self->size, 0, (size_t)(capacity - self->size) * DIGEST_SIZE);
    free(self->tags);
    self->tags = tags;
    self->capacity = capacity;
    return 0;
}

static PyObject *Table_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "max_token_length", NULL};
    Py_buffer key;
    Py_ssize_t max_token;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*n:Table", kwlist, &key, &max_token))
        return NULL;
    if (key.len < 1 || key.len > 64) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "the BLAKE2b key must be 1 to 64 bytes");
        return NULL;
    }
    Table *self = (Table *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyBuffer_Release(&key);
        return NULL;
    }
    keyed_init(&self->key, key.buf, (size_t)key.len);
    PyBuffer_Release(&key);
    self->max_token = max_token;
    if (table_grow(self, 8) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int Table_traverse(Table *self, visitproc visit, void *arg)
{
    for (Py_ssize_t i = 0; i < self->size; i++)
        Py_VISIT(self->entries[i]);
    return 0;
}

/* The collector's tp_clear, and dealloc: the last entry taken out, the table left whole,
 * then its reference dropped, one at a time. Dropping one may run a finalizer, which may
 * use the table (insert, remove, clear); it finds it consistent, and what it inserts is
 * released in turn. No allocation: tp_clear cannot fail. */
static int Table_clear_refs(Table *self)
{
    while (self->size > 0) {
        Py_ssize_t last = --self->size;
        PyObject *entry = self->entries[last];
        self->entries[last] = NULL;
        self->tags[last] = 0;
        memset(self->digests[last], 0, DIGEST_SIZE);
        self->version++;
        Py_DECREF(entry);
    }
    return 0;
}

static void Table_dealloc(Table *self)
{
    PyObject_GC_UnTrack(self);
    Table_clear_refs(self);
    free(self->tags);
    PyMem_RawFree(self->digests);
    PyMem_RawFree(self->seen);
    PyMem_RawFree(self->entries);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The slot whose full digest equals d, or -1: the tag scan, then both candidates compared. */
static Py_ssize_t table_find(Table *self, const uint8_t d[DIGEST_SIZE])
{
    int64_t first, last;
    uint64_t probe;
    memcpy(&probe, d, 8);
    scan_kernel(self->tags, self->size, probe, &first, &last);
    /* No match: both compares run against a dummy, and their answer is masked off. */
    uint64_t found = ~mask_eq((uint64_t)first, (uint64_t)-1);
    uint64_t fi = select64(found, (uint64_t)first, 0);
    uint64_t li = select64(found, (uint64_t)last, 0);
    /* Slot 0 exists even in an empty table (capacity >= 8, zeroed past size). */
    uint64_t ok_first = found & (0 - (uint64_t)ks_equal32(self->digests[fi], d));
    uint64_t ok_last = found & (0 - (uint64_t)ks_equal32(self->digests[li], d));
    return (Py_ssize_t)select64(ok_first, fi, select64(ok_last, li, (uint64_t)-1));
}

static int digest_arg(PyObject *obj, uint8_t out[DIGEST_SIZE])
{
    if (!PyBytes_CheckExact(obj) || PyBytes_GET_SIZE(obj) != DIGEST_SIZE) {
        PyErr_SetString(PyExc_TypeError, "a digest is 32 bytes");
        return -1;
    }
    memcpy(out, PyBytes_AS_STRING(obj), DIGEST_SIZE);
    return 0;
}

static int slot_arg(Table *self, PyObject *obj, Py_ssize_t *slot)
{
    Py_ssize_t i = PyLong_AsSsize_t(obj);
    if (i == -1 && PyErr_Occurred())
        return -1;
    if (i < 0 || i >= self->size) {
        PyErr_SetString(PyExc_IndexError, "slot out of range");
        return -1;
    }
    *slot = i;
    return 0;
}

static PyObject *Table_digest(Table *self, PyObject *token)
{
    Py_buffer view;
    uint8_t out[DIGEST_SIZE];
    if (PyObject_GetBuffer(token, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    keyed_digest(&self->key, view.buf, (size_t)view.len, out);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, DIGEST_SIZE);
}

static PyObject *Table_lookup(Table *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint8_t d[DIGEST_SIZE];
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lookup(digest, now)");
        return NULL;
    }
    if (digest_arg(args[0], d) < 0)
        return NULL;
    double now = PyFloat_AsDouble(args[1]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t slot = table_find(self, d);
    if (slot < 0)
        Py_RETURN_NONE;
    self->seen[slot] = now;
    return Py_NewRef(self->entries[slot]);
}

/* -- the header walk ---------------------------------------------------------------------
 *
 * The rules of keystile.credentials.split_credential; an empty API-key header is no
 * credential and is removed with the key. Anything but a plain hit, and anything unusual
 * on the way (a conflict, Bearer without a token, a header list that is not a list of
 * (bytes, bytes) tuples, a bearer token the filter does not claim, more than
 * MAX_CREDENTIAL_HEADERS credential headers), returns None: Python decides then.
 */

static inline int is_space(uint8_t c)
{
    /* bytes.split()/strip() whitespace */
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\x0b' || c == '\x0c';
}

static void strip(const uint8_t **p, Py_ssize_t *len)
{
    const uint8_t *s = *p;
    Py_ssize_t n = *len;
    while (n && is_space(s[0])) {
        s++;
        n--;
    }
    while (n && is_space(s[n - 1]))
        n--;
    *p = s;
    *len = n;
}

/* 1: a bearer credential in *tok; 0: not a bearer credential (another scheme). */
static int bearer_token(const uint8_t *v, Py_ssize_t n, const uint8_t **tok, Py_ssize_t *len)
{
    static const char bearer[] = "bearer";
    Py_ssize_t i = 0;
    while (i < n && is_space(v[i]))
        i++;
    Py_ssize_t start = i;
    while (i < n && !is_space(v[i]))
        i++;
    if (i - start != 6)
        return 0;
    for (int k = 0; k < 6; k++) {
        uint8_t c = v[start + k];
        if (c >= 'A' && c <= 'Z')
            c = (uint8_t)(c + 32);
        if (c != (uint8_t)bearer[k])
            return 0;
    }
    *tok = v + i;
    *len = n - i;
    strip(tok, len);
    return 1;
}

static int has_prefix(PyObject *prefixes, const uint8_t *tok, Py_ssize_t len)
{
    Py_ssize_t count = PyTuple_GET_SIZE(prefixes);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *p = PyTuple_GET_ITEM(prefixes, i);
        Py_ssize_t plen = PyBytes_GET_SIZE(p);
        if (plen <= len && memcmp(PyBytes_AS_STRING(p), tok, (size_t)plen) == 0)
            return 1;
    }
    return 0;
}

/* Table.hit(headers, header_name, prefixes, now) -> (entry, headers_without) | None */
static PyObject *Table_hit(Table *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "hit(headers, header_name, prefixes, now)");
        return NULL;
    }
    PyObject *headers = args[0], *header = args[1], *prefixes = args[2];
    if (!PyList_CheckExact(headers) || !PyBytes_CheckExact(header) ||
        (prefixes != Py_None && !PyTuple_CheckExact(prefixes)))
        Py_RETURN_NONE;
    if (prefixes != Py_None) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(prefixes); i++)
            if (!PyBytes_CheckExact(PyTuple_GET_ITEM(prefixes, i)))
                Py_RETURN_NONE;
    }
    double now = PyFloat_AsDouble(args[3]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    const char *hname = PyBytes_AS_STRING(header);
    Py_ssize_t hlen = PyBytes_GET_SIZE(header);

    Py_ssize_t n = PyList_GET_SIZE(headers);
    Py_ssize_t hits[MAX_CREDENTIAL_HEADERS];
    int count = 0;
    const uint8_t *token = NULL;
    Py_ssize_t token_len = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(headers, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
            Py_RETURN_NONE;
        PyObject *name = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value))
            Py_RETURN_NONE;
        Py_ssize_t nlen = PyBytes_GET_SIZE(name);
        const char *nstr = PyBytes_AS_STRING(name);
        const uint8_t *v = (const uint8_t *)PyBytes_AS_STRING(value);
        Py_ssize_t vlen = PyBytes_GET_SIZE(value);
        const uint8_t *cand;
        Py_ssize_t clen;
        int bearer = 0;
        if (nlen == 13 && memcmp(nstr, "authorization", 13) == 0) {
            if (!bearer_token(v, vlen, &cand, &clen))
                continue;
            if (prefixes != Py_None && clen && !has_prefix(prefixes, cand, clen))
                Py_RETURN_NONE; /* maybe not ours: let Python's filter decide */
            bearer = 1;
        }
        else if (nlen == hlen && memcmp(nstr, hname, (size_t)hlen) == 0) {
            cand = v;
            clen = vlen;
            strip(&cand, &clen);
        }
        else
            continue;
        if (count == MAX_CREDENTIAL_HEADERS || (clen == 0 && bearer))
            Py_RETURN_NONE; /* Bearer without a token is Python's 400 */
        if (clen == 0) {
            hits[count++] = i; /* an empty API-key header: no key, removed all the same */
            continue;
        }
        if (token != NULL && (clen != token_len || memcmp(cand, token, (size_t)clen) != 0))
            Py_RETURN_NONE; /* two different keys */
        token = cand;
        token_len = clen;
        hits[count++] = i;
    }
    if (token == NULL || token_len > self->max_token)
        Py_RETURN_NONE;

    uint8_t d[DIGEST_SIZE];
    keyed_digest(&self->key, token, (size_t)token_len, d);
    Py_ssize_t slot = table_find(self, d);
    if (slot < 0)
        Py_RETURN_NONE;
    self->seen[slot] = now;

    /* Allocating may run the collector, and so any finalizer, which may change the table
     * (slot then belongs to another key, or to none) or the header list (hits, n). Both
     * allocations come first; if either changed meanwhile, Python decides afresh. */
    uint64_t version = self->version;
    PyObject *without = PyList_New(n - count);
    if (without == NULL)
        return NULL;
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(without);
        return NULL;
    }
    if (self->version != version || PyList_GET_SIZE(headers) != n) {
        Py_DECREF(result);
        Py_DECREF(without);
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0, j = 0, k = 0; i < n; i++) {
        if (k < count && hits[k] == i) {
            k++;
            continue;
        }
        PyList_SET_ITEM(without, j++, Py_NewRef(PyList_GET_ITEM(headers, i)));
    }
    PyTuple_SET_ITEM(result, 0, Py_NewRef(self->entries[slot]));
    PyTuple_SET_ITEM(result, 1, without);
    return result;
}

/* -- maintenance ----------------------------------------------------------------------- */

static PyObject *Table_append(Table *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint8_t d[DIGEST_SIZE];
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "append(digest, entry, now)");
        return NULL;
    }
    if (digest_arg(args[0], d) < 0)
        return NULL;
    double now = PyFloat_AsDouble(args[2]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (self->size == self->capacity && table_grow(self, self->capacity * 2) < 0)
        return NULL;
    Py_ssize_t slot = self->size;
    memcpy(self->digests[slot], d, DIGEST_SIZE);
    memcpy(&self->tags[slot], d, 8);
    self->seen[slot] = now;
    self->entries[slot] = Py_NewRef(args[1]);
    self->size = slot + 1;
    self->version++;
    return PyLong_FromSsize_t(slot);
}

static PyObject *Table_put(Table *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* put(slot, digest, entry, now): a slot's digest and entry replaced */
    uint8_t d[DIGEST_SIZE];
    Py_ssize_t slot;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "put(slot, digest, entry, now)");
        return NULL;
    }
    /* now's conversion may run Python code that changes the table: the slot is checked
     * after it (slot_arg's own conversion comes before its range check). */
    if (digest_arg(args[1], d) < 0)
        return NULL;
    double now = PyFloat_AsDouble(args[3]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (slot_arg(self, args[0], &slot) < 0)
        return NULL;
    memcpy(self->digests[slot], d, DIGEST_SIZE);
    memcpy(&self->tags[slot], d, 8);
    self->seen[slot] = now;
    self->version++;
    /* the old entry is released last, the table whole: its finalizer may use it */
    Py_SETREF(self->entries[slot], Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

static PyObject *Table_set_entry(Table *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t slot;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_entry(slot, entry)");
        return NULL;
    }
    if (slot_arg(self, args[0], &slot) < 0)
        return NULL;
    self->version++;
    Py_SETREF(self->entries[slot], Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static PyObject *Table_entry(Table *self, PyObject *arg)
{
    Py_ssize_t slot;
    if (slot_arg(self, arg, &slot) < 0)
        return NULL;
    return Py_NewRef(self->entries[slot]);
}

static PyObject *Table_remove(Table *self, PyObject *arg)
{
    /* remove(slot) -> the entry moved into slot (the last one), or None */
    Py_ssize_t slot;
    if (slot_arg(self, arg, &slot) < 0)
        return NULL;
    Py_ssize_t last = self->size - 1;
    PyObject *removed = self->entries[slot];
    PyObject *moved = Py_None;
    if (slot != last) {
        memcpy(self->digests[slot], self->digests[last], DIGEST_SIZE);
        self->tags[slot] = self->tags[last];
        self->seen[slot] = self->seen[last];
        self->entries[slot] = self->entries[last];
        moved = self->entries[slot];
    }
    self->tags[last] = 0;
    memset(self->digests[last], 0, DIGEST_SIZE);
    self->entries[last] = NULL;
    self->size = last;
    self->version++;
    /* released last, the table whole: the removed entry's finalizer may use it */
    Py_INCREF(moved);
    Py_DECREF(removed);
    return moved;
}

static PyObject *Table_clear(Table *self, PyObject *Py_UNUSED(ignored))
{
    /* Every entry taken out and the table emptied before the first reference is dropped:
     * a finalizer run by a release finds an empty table, and what it inserts stays. */
    Py_ssize_t size = self->size;
    if (size == 0)
        Py_RETURN_NONE;
    PyObject **taken = PyMem_RawMalloc((size_t)size * sizeof *taken);
    if (taken == NULL) {
        /* Rather than fail and leave every key cached: one at a time from the end (what a
         * finalizer inserts meanwhile goes too). */
        Table_clear_refs(self);
        Py_RETURN_NONE;
    }
    memcpy(taken, self->entries, (size_t)size * sizeof *taken);
    memset(self->entries, 0, (size_t)size * sizeof *self->entries);
    memset(self->tags, 0, (size_t)size * sizeof *self->tags);
    memset(self->digests, 0, (size_t)size * DIGEST_SIZE);
    self->size = 0;
    self->version++;
    for (Py_ssize_t i = 0; i < size; i++)
        Py_DECREF(taken[i]);
    PyMem_RawFree(taken);
    Py_RETURN_NONE;
}

static PyObject *Table_oldest(Table *self, PyObject *Py_UNUSED(ignored))
{
    /* the slot least recently seen (the first of equals), or -1 when empty */
    Py_ssize_t best = -1;
    for (Py_ssize_t i = 0; i < self->size; i++)
        if (best < 0 || self->seen[i] < self->seen[best])
            best = i;
    return PyLong_FromSsize_t(best);
}

static PyObject *Table_idle(Table *self, PyObject *arg)
{
    /* the slots seen before `since`, in increasing order */
    double since = PyFloat_AsDouble(arg);
    if (since == -1.0 && PyErr_Occurred())
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->size; i++) {
        if (self->seen[i] < since) {
            PyObject *slot = PyLong_FromSsize_t(i);
            if (slot == NULL || PyList_Append(out, slot) < 0) {
                Py_XDECREF(slot);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(slot);
        }
    }
    return out;
}

static PyObject *Table_entries(Table *self, PyObject *Py_UNUSED(ignored))
{
    /* Allocating the list may run a finalizer that changes the size: then again. */
    for (;;) {
        Py_ssize_t size = self->size;
        PyObject *out = PyList_New(size);
        if (out == NULL)
            return NULL;
        if (self->size == size) {
            for (Py_ssize_t i = 0; i < size; i++)
                PyList_SET_ITEM(out, i, Py_NewRef(self->entries[i]));
            return out;
        }
        Py_DECREF(out);
    }
}

static PyObject *Table_digest_at(Table *self, PyObject *arg)
{
    Py_ssize_t slot;
    if (slot_arg(self, arg, &slot) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)self->digests[slot], DIGEST_SIZE);
}

static Py_ssize_t Table_len(Table *self) { return self->size; }

/* Each docstring opens with its signature ("name($self, ...)\n--\n\n"), which
 * inspect.signature reads: tests/speedups/test_speedups_stub.py holds _speedups.pyi to it. */
static PyMethodDef Table_methods[] = {
    {"hit", (PyCFunction)(void (*)(void))Table_hit, METH_FASTCALL,
     "hit($self, headers, header_name, prefixes, now, /)\n--\n\n"
     "(entry, headers without credentials), or None to let Python decide"},
    {"digest", (PyCFunction)Table_digest, METH_O,
     "digest($self, token, /)\n--\n\nThe keyed digest of token"},
    {"lookup", (PyCFunction)(void (*)(void))Table_lookup, METH_FASTCALL,
     "lookup($self, digest, now, /)\n--\n\nThe entry or None (constant-time scan)"},
    {"append", (PyCFunction)(void (*)(void))Table_append, METH_FASTCALL,
     "append($self, digest, entry, now, /)\n--\n\nThe slot of the new entry"},
    {"put", (PyCFunction)(void (*)(void))Table_put, METH_FASTCALL,
     "put($self, slot, digest, entry, now, /)\n--\n\nReplace a slot's digest and entry"},
    {"set_entry", (PyCFunction)(void (*)(void))Table_set_entry, METH_FASTCALL,
     "set_entry($self, slot, entry, /)\n--\n\nReplace a slot's entry"},
    {"entry", (PyCFunction)Table_entry, METH_O, "entry($self, slot, /)\n--\n\nA slot's entry"},
    {"digest_at", (PyCFunction)Table_digest_at, METH_O,
     "digest_at($self, slot, /)\n--\n\nA slot's digest"},
    {"remove", (PyCFunction)Table_remove, METH_O,
     "remove($self, slot, /)\n--\n\nThe entry moved into slot, or None"},
    {"clear", (PyCFunction)Table_clear, METH_NOARGS, "clear($self, /)\n--\n\nRemove every entry"},
    {"oldest", (PyCFunction)Table_oldest, METH_NOARGS,
     "oldest($self, /)\n--\n\nThe slot least recently seen, or -1 when empty"},
    {"idle", (PyCFunction)Table_idle, METH_O,
     "idle($self, since, /)\n--\n\nThe slots seen before since, in increasing order"},
    {"entries", (PyCFunction)Table_entries, METH_NOARGS,
     "entries($self, /)\n--\n\nEvery entry, in slot order"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Table_as_sequence = {
    .sq_length = (lenfunc)Table_len,
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "keystile._speedups.Table",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Table(key, max_token_length)\n--\n\n"
              "The verified-key cache's tags, digests, last-use times and entries.",
    .tp_new = Table_new,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_traverse = (traverseproc)Table_traverse,
    .tp_clear = (inquiry)Table_clear_refs,
    .tp_methods = Table_methods,
    .tp_as_sequence = &Table_as_sequence,
};

/* -- module ---------------------------------------------------------------------------- */

static PyObject *set_kernel(PyObject *module, PyObject *arg)
{
    /* for tests: "avx2", "sse2" or "scalar"; ValueError when this CPU cannot run it */
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL)
        return NULL;
    if (strcmp(name, "scalar") == 0) {
        scan_kernel = ks_scan_scalar;
        scan_kernel_name = "scalar";
        Py_RETURN_NONE;
    }
#if KS_X86
    if (strcmp(name, "sse2") == 0 && __builtin_cpu_supports("sse2")) {
        scan_kernel = ks_scan_sse2;
        scan_kernel_name = "sse2";
        Py_RETURN_NONE;
    }
    if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2")) {
        scan_kernel = ks_scan_avx2;
        scan_kernel_name = "avx2";
        Py_RETURN_NONE;
    }
#endif
    PyErr_Format(PyExc_ValueError, "scan kernel %R is not available here", arg);
    return NULL;
}

static PyObject *kernels(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    /* the kernels this CPU can run, best first */
#if KS_X86
    if (__builtin_cpu_supports("avx2"))
        return Py_BuildValue("(sss)", "avx2", "sse2", "scalar");
    if (__builtin_cpu_supports("sse2"))
        return Py_BuildValue("(ss)", "sse2", "scalar");
#endif
    return Py_BuildValue("(s)", "scalar");
}

static PyObject *kernel(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(scan_kernel_name);
}

static PyMethodDef module_methods[] = {
    {"set_kernel", set_kernel, METH_O,
     "set_kernel($module, name, /)\n--\n\nChoose the scan kernel (tests)"},
    {"kernels", kernels, METH_NOARGS,
     "kernels($module, /)\n--\n\nThe scan kernels this CPU runs, best first"},
    {"kernel", kernel, METH_NOARGS, "kernel($module, /)\n--\n\nThe scan kernel in use"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "keystile._speedups",
    .m_doc = "The compiled cache-hit path of keystile (see keystile/_speedups.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
#if KS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) {
        scan_kernel = ks_scan_avx2;
        scan_kernel_name = "avx2";
    }
    else if (__builtin_cpu_supports("sse2")) {
        scan_kernel = ks_scan_sse2;
        scan_kernel_name = "sse2";
    }
#endif
    if (PyType_Ready(&TableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Table", (PyObject *)&TableType) < 0 ||
        PyModule_AddIntConstant(m, "DIGEST_SIZE", DIGEST_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

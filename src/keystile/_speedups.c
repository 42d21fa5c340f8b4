/*
 * keystile._speedups: the cache-hit path in C.
 *
 * One Table holds what a cache hit reads: the 32-byte keyed BLAKE2b digest of every
 * cached key (its 8-byte tag apart, for the scan) and the key's state: its principal,
 * expiry, when its state was read and when it was last used, and its uses since they were
 * last harvested (see "the table" below). Table.hit() takes an ASGI header list and does
 * in one call what the pure-Python path does in several (split_credential, the keyed
 * digest, the tag scan, the freshness and expiry checks, UsageRecorder.touch), and
 * declines (returns None) whenever the request is not a plain hit, so that Python decides
 * everything unusual.
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
#include <time.h>
#include <sys/mman.h>
#include <structmember.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define KS_X86 1
#include <immintrin.h>
#else
#define KS_X86 0
#endif

#define KS_EXPORT __attribute__((noinline, visibility("hidden")))

#define DIGEST_SIZE 32
#define TAG_SIZE 8
#define TAIL_SIZE (DIGEST_SIZE - TAG_SIZE)
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

/* -- the table -------------------------------------------------------------------------
 *
 * Per slot: the tag (tags[], scanned), the rest of the digest (tails[], two compared per
 * lookup) and a slot_state (state[], read once the slot is known): the key's state as last
 * read from the store, its principal, and its usage since the last harvest. A key id index
 * (open addressing, linear probing, slot numbers) finds a key's slot for the maintenance
 * calls. The arrays grow by doubling into zeroed memory that is only written as slots fill,
 * so the pages past the last slot cost no resident memory.
 */

typedef struct {
    double seen;      /* monotonic: last found by a lookup (idle and size eviction) */
    double checked;   /* monotonic: the state was last read from the store */
    double expires;   /* wall clock: the key's expiry, +inf for none */
    double last_used; /* wall clock: the latest use counted by hit() */
    PyObject *key_id; /* str */
    PyObject *user;   /* the principal */
    PyObject *scopes; /* request.auth's scopes */
    uint32_t uses;    /* uses counted by hit() since the last harvest; > 0: pending */
    uint32_t plain;   /* no limits and no IP allowlist: hit() may count its use */
} slot_state;

/* The usage of a slot removed before it was harvested. */
typedef struct {
    PyObject *key_id;
    double last_used;
    uint32_t uses;
} released_use;

typedef struct {
    PyObject_HEAD
    Py_ssize_t size;
    Py_ssize_t capacity;       /* a multiple of 8; arrays are zero past size */
    uint64_t *tags;            /* 32-byte aligned, for the vector loads */
    void *tags_block;          /* the allocation tags is aligned in */
    uint8_t (*tails)[TAIL_SIZE]; /* each digest past its tag */
    slot_state *state;
    int32_t *index;            /* key id -> slot; -1: empty */
    size_t index_mask;
    uint64_t version;          /* bumped by every change of the slots (see Table_hit) */
    Py_ssize_t max_token;
    keyed_blake2b key;
    double ttl;                /* seconds a state may be old on a hit */
    PyObject *monotonic;       /* the clocks hit() reads; NULL: clock_gettime */
    PyObject *clock;
    unsigned long long hits;   /* hits answered by hit() */
    char count_uses;           /* hit() counts the uses of plain slots */
    double minute_end;         /* hit() declines to count at or past it */
    Py_ssize_t pending;        /* slots with uses > 0 */
    Py_ssize_t pending_limit;  /* hit() declines to make more slots pending than this */
    released_use *released;
    Py_ssize_t n_released;
    Py_ssize_t cap_released;
} Table;

static inline Py_hash_t key_hash(PyObject *key)
{
    return PyObject_Hash(key); /* an exact str: cached after the first call, no Python code */
}

static inline int key_equal(PyObject *a, PyObject *b)
{
    return a == b || (PyUnicode_GET_LENGTH(a) == PyUnicode_GET_LENGTH(b) &&
                      PyUnicode_Compare(a, b) == 0);
}

/* The index position of key: the one naming its slot, or the empty one it would take. */
static size_t index_probe(const Table *self, PyObject *key, Py_hash_t hash)
{
    size_t pos = (size_t)hash & self->index_mask;
    for (;;) {
        int32_t s = self->index[pos];
        if (s < 0 || key_equal(self->state[s].key_id, key))
            return pos;
        pos = (pos + 1) & self->index_mask;
    }
}

static Py_ssize_t index_find(const Table *self, PyObject *key)
{
    return self->index[index_probe(self, key, key_hash(key))];
}

/* Empty position pos, shifting back the entries after it that probed past it. */
static void index_delete(Table *self, size_t pos)
{
    size_t mask = self->index_mask, hole = pos, j = pos;
    for (;;) {
        j = (j + 1) & mask;
        int32_t s = self->index[j];
        if (s < 0)
            break;
        size_t home = (size_t)key_hash(self->state[s].key_id) & mask;
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            self->index[hole] = s;
            hole = j;
        }
    }
    self->index[hole] = -1;
}

/* Zeroed memory. A large block is mapped on its own: its pages past the slots in use are
 * never touched, so they cost no resident memory, and freeing it gives it all back (a
 * heap block would leave its pages behind after the table grows out of it). */
#define MAPPED_SIZE ((size_t)64 * 1024)

static void *zero_alloc(size_t size)
{
    if (size >= MAPPED_SIZE) {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return p == MAP_FAILED ? NULL : p;
    }
    return PyMem_RawCalloc(1, size);
}

static void zero_free(void *p, size_t size)
{
    if (p == NULL)
        return;
    if (size >= MAPPED_SIZE)
        munmap(p, size);
    else
        PyMem_RawFree(p);
}

/* The sizes of a table's blocks at a capacity. 8 tags of padding past capacity: the AVX2
 * scan reads the block after the last whole one even when the table is full (those lanes
 * are masked off); 4 more to align. */
static size_t tags_bytes(Py_ssize_t capacity) { return ((size_t)capacity + 12) * sizeof(uint64_t); }
static size_t tails_bytes(Py_ssize_t capacity) { return (size_t)capacity * TAIL_SIZE; }
static size_t state_bytes(Py_ssize_t capacity) { return (size_t)capacity * sizeof(slot_state); }
static size_t index_bytes(size_t mask) { return (mask + 1) * sizeof(int32_t); }

static void table_free_blocks(Table *self)
{
    zero_free(self->tags_block, tags_bytes(self->capacity));
    zero_free(self->tails, tails_bytes(self->capacity));
    zero_free(self->state, state_bytes(self->capacity));
    zero_free(self->index, index_bytes(self->index_mask));
}

static int table_grow(Table *self, Py_ssize_t capacity)
{
    capacity = (capacity + 7) & ~(Py_ssize_t)7; /* the AVX2 scan reads 8 tags at a time */
    if (capacity <= self->capacity)
        return 0;
    if (capacity > INT32_MAX / 2 || (size_t)capacity > PY_SSIZE_T_MAX / sizeof(slot_state)) {
        PyErr_NoMemory();
        return -1;
    }
    size_t index_size = 16;
    while (index_size < 2 * (size_t)capacity)
        index_size <<= 1;
    void *tags_block = zero_alloc(tags_bytes(capacity));
    uint8_t(*tails)[TAIL_SIZE] = zero_alloc(tails_bytes(capacity));
    slot_state *state = zero_alloc(state_bytes(capacity));
    int32_t *index = zero_alloc(index_bytes(index_size - 1));
    if (tags_block == NULL || tails == NULL || state == NULL || index == NULL) {
        zero_free(tags_block, tags_bytes(capacity));
        zero_free(tails, tails_bytes(capacity));
        zero_free(state, state_bytes(capacity));
        zero_free(index, index_bytes(index_size - 1));
        PyErr_NoMemory();
        return -1;
    }
    uint64_t *tags = (uint64_t *)(((uintptr_t)tags_block + 31) & ~(uintptr_t)31);
    if (self->size) {
        memcpy(tags, self->tags, (size_t)self->size * sizeof *tags);
        memcpy(tails, self->tails, (size_t)self->size * TAIL_SIZE);
        memcpy(state, self->state, (size_t)self->size * sizeof *state);
    }
    memset(index, 0xff, index_bytes(index_size - 1));
    table_free_blocks(self);
    self->tags_block = tags_block;
    self->tags = tags;
    self->tails = tails;
    self->state = state;
    self->index = index;
    self->index_mask = index_size - 1;
    self->capacity = capacity;
    for (Py_ssize_t i = 0; i < self->size; i++) {
        PyObject *key = self->state[i].key_id;
        self->index[index_probe(self, key, key_hash(key))] = (int32_t)i;
    }
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
    self->ttl = Py_HUGE_VAL;
    self->minute_end = Py_HUGE_VAL;
    self->pending_limit = PY_SSIZE_T_MAX;
    if (table_grow(self, 8) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int Table_traverse(Table *self, visitproc visit, void *arg)
{
    for (Py_ssize_t i = 0; i < self->size; i++) {
        Py_VISIT(self->state[i].user);
        Py_VISIT(self->state[i].scopes);
    }
    Py_VISIT(self->monotonic);
    Py_VISIT(self->clock);
    return 0;
}

/* Keep the usage of a slot that leaves the table for the next harvest; takes the key id's
 * reference, or returns -1 (no memory: that usage is lost, the reference left with the
 * caller). */
static int released_push(Table *self, PyObject *key_id, double last_used, uint32_t uses)
{
    if (self->n_released == self->cap_released) {
        Py_ssize_t cap = self->cap_released ? self->cap_released * 2 : 16;
        released_use *grown = PyMem_RawRealloc(self->released, (size_t)cap * sizeof *grown);
        if (grown == NULL)
            return -1;
        self->released = grown;
        self->cap_released = cap;
    }
    self->released[self->n_released++] = (released_use){key_id, last_used, uses};
    return 0;
}

/* Take slot out of the table, moving the last slot into it. Its references go to out[0..2]
 * (the key id's NULL when it went to the released usage) for the caller to drop once it is
 * done with the table. No Python code runs. */
static void table_take(Table *self, Py_ssize_t slot, PyObject *out[3])
{
    slot_state *st = &self->state[slot];
    index_delete(self, index_probe(self, st->key_id, key_hash(st->key_id)));
    out[0] = st->key_id;
    out[1] = st->user;
    out[2] = st->scopes;
    if (st->uses) {
        self->pending--;
        if (released_push(self, st->key_id, st->last_used, st->uses) == 0)
            out[0] = NULL;
    }
    Py_ssize_t last = self->size - 1;
    if (slot != last) {
        memcpy(self->tails[slot], self->tails[last], TAIL_SIZE);
        self->tags[slot] = self->tags[last];
        self->state[slot] = self->state[last];
        PyObject *moved = self->state[slot].key_id;
        self->index[index_probe(self, moved, key_hash(moved))] = (int32_t)slot;
    }
    self->tags[last] = 0;
    memset(self->tails[last], 0, TAIL_SIZE);
    memset(&self->state[last], 0, sizeof(slot_state));
    self->size = last;
    self->version++;
}

static void drop_refs(PyObject *refs[3])
{
    Py_XDECREF(refs[0]);
    Py_XDECREF(refs[1]);
    Py_XDECREF(refs[2]);
}

/* References taken out of the table, released together once it is whole (a release runs
 * finalizers, which may use the table). Without memory to hold them, each is released at
 * once: the table is whole after each take, only the caller's loop must cope. */
typedef struct {
    PyObject **refs;
    Py_ssize_t n, cap;
} ref_bag;

static void bag_put(ref_bag *bag, PyObject *refs[3])
{
    if (bag->n + 3 > bag->cap) {
        Py_ssize_t cap = bag->cap ? bag->cap * 2 : 48;
        PyObject **grown = PyMem_RawRealloc(bag->refs, (size_t)cap * sizeof *grown);
        if (grown == NULL) {
            drop_refs(refs);
            return;
        }
        bag->refs = grown;
        bag->cap = cap;
    }
    for (int i = 0; i < 3; i++)
        bag->refs[bag->n++] = refs[i];
}

static void bag_release(ref_bag *bag)
{
    for (Py_ssize_t i = 0; i < bag->n; i++)
        Py_XDECREF(bag->refs[i]);
    PyMem_RawFree(bag->refs);
    bag->refs = NULL;
    bag->n = bag->cap = 0;
}

static void released_clear(Table *self)
{
    released_use *released = self->released;
    Py_ssize_t n = self->n_released;
    self->released = NULL;
    self->n_released = self->cap_released = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(released[i].key_id);
    PyMem_RawFree(released);
}

/* The collector's tp_clear, and dealloc: the last slot taken out, the table left whole,
 * then its references dropped, one at a time. Dropping one may run a finalizer, which may
 * use the table (insert, remove, clear); it finds it consistent, and what it inserts is
 * released in turn. No allocation: tp_clear cannot fail. */
static int Table_clear_refs(Table *self)
{
    while (self->size > 0) {
        PyObject *refs[3];
        self->state[self->size - 1].uses = 0; /* no usage kept: the table is going */
        table_take(self, self->size - 1, refs);
        drop_refs(refs);
    }
    self->pending = 0;
    released_clear(self);
    Py_CLEAR(self->monotonic);
    Py_CLEAR(self->clock);
    return 0;
}

static void Table_dealloc(Table *self)
{
    PyObject_GC_UnTrack(self);
    Table_clear_refs(self);
    table_free_blocks(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A slot's whole digest: its tag, then its tail. */
static inline void slot_digest(const Table *self, Py_ssize_t slot, uint8_t out[DIGEST_SIZE])
{
    memcpy(out, &self->tags[slot], TAG_SIZE);
    memcpy(out + TAG_SIZE, self->tails[slot], TAIL_SIZE);
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
    uint8_t first_digest[DIGEST_SIZE], last_digest[DIGEST_SIZE];
    slot_digest(self, (Py_ssize_t)fi, first_digest);
    slot_digest(self, (Py_ssize_t)li, last_digest);
    uint64_t ok_first = found & (0 - (uint64_t)ks_equal32(first_digest, d));
    uint64_t ok_last = found & (0 - (uint64_t)ks_equal32(last_digest, d));
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

static int key_id_arg(PyObject *obj)
{
    if (!PyUnicode_CheckExact(obj)) {
        PyErr_SetString(PyExc_TypeError, "a key id is a str");
        return -1;
    }
    return key_hash(obj) == -1 ? -1 : 0;
}

static int time_arg(PyObject *obj, double *out)
{
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* An expiry: None for none (+inf inside), else epoch seconds. */
static int expiry_arg(PyObject *obj, double *out)
{
    if (obj == Py_None) {
        *out = Py_HUGE_VAL;
        return 0;
    }
    return time_arg(obj, out);
}

static int read_clock(PyObject *fn, clockid_t id, double *out)
{
    if (fn == NULL) {
        struct timespec ts;
        clock_gettime(id, &ts);
        *out = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        return 0;
    }
    PyObject *value = PyObject_CallNoArgs(fn);
    if (value == NULL)
        return -1;
    int ok = time_arg(value, out);
    Py_DECREF(value);
    return ok;
}

/* (user, expires_at or None, checked_at): a slot's state as of the call. Takes user's
 * reference; the doubles are copies, so a finalizer run by these allocations changes
 * nothing the answer holds. */
static PyObject *state_tuple(PyObject *user, double expires, double checked)
{
    PyObject *exp = expires == Py_HUGE_VAL ? Py_NewRef(Py_None) : PyFloat_FromDouble(expires);
    PyObject *chk = PyFloat_FromDouble(checked);
    if (exp == NULL || chk == NULL) {
        Py_XDECREF(exp);
        Py_XDECREF(chk);
        Py_DECREF(user);
        return NULL;
    }
    PyObject *out = PyTuple_New(3);
    if (out == NULL) {
        Py_DECREF(exp);
        Py_DECREF(chk);
        Py_DECREF(user);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, user);
    PyTuple_SET_ITEM(out, 1, exp);
    PyTuple_SET_ITEM(out, 2, chk);
    return out;
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
    /* lookup(digest, now) -> (user, expires_at, checked_at) or None; marks the slot used */
    uint8_t d[DIGEST_SIZE];
    double now;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lookup(digest, now)");
        return NULL;
    }
    if (digest_arg(args[0], d) < 0 || time_arg(args[1], &now) < 0)
        return NULL;
    Py_ssize_t slot = table_find(self, d);
    if (slot < 0)
        Py_RETURN_NONE;
    slot_state *st = &self->state[slot];
    st->seen = now;
    return state_tuple(Py_NewRef(st->user), st->expires, st->checked);
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

/* Table.hit(headers, header_name, prefixes, count)
 *     -> (user, auth_scopes, headers_without, counted) | None
 *
 * A plain hit on a fresh, unexpired key, counted in hits; with count true, a plain slot's
 * use is counted too (counted is then True) unless the minute has ended or too many slots
 * are pending: then it declines, and Python counts (and harvests) instead. */
static PyObject *Table_hit(Table *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "hit(headers, header_name, prefixes, count)");
        return NULL;
    }
    /* The clocks first: a Python clock may run any code, and nothing is held yet. */
    double now, wall;
    if (read_clock(self->monotonic, CLOCK_MONOTONIC, &now) < 0 ||
        read_clock(self->clock, CLOCK_REALTIME, &wall) < 0)
        return NULL;
    PyObject *headers = args[0], *header = args[1], *prefixes = args[2];
    int count_use = args[3] == Py_True && self->count_uses;
    if (!PyList_CheckExact(headers) || !PyBytes_CheckExact(header) ||
        (prefixes != Py_None && !PyTuple_CheckExact(prefixes)))
        Py_RETURN_NONE;
    if (prefixes != Py_None) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(prefixes); i++)
            if (!PyBytes_CheckExact(PyTuple_GET_ITEM(prefixes, i)))
                Py_RETURN_NONE;
    }
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
    slot_state *st = &self->state[slot];
    st->seen = now;
    if (now - st->checked > self->ttl || wall >= st->expires)
        Py_RETURN_NONE; /* stale or expired: Python refreshes or refuses */
    count_use = count_use && st->plain;
    if (count_use &&
        (wall >= self->minute_end || (st->uses == 0 && self->pending >= self->pending_limit)))
        Py_RETURN_NONE; /* Python counts this one, and harvests */

    /* Allocating may run the collector, and so any finalizer, which may change the table
     * (slot then belongs to another key, or to none) or the header list (hits, n). Both
     * allocations come first; if either changed meanwhile, Python decides afresh. */
    uint64_t version = self->version;
    PyObject *without = PyList_New(n - count);
    if (without == NULL)
        return NULL;
    PyObject *result = PyTuple_New(4);
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
    st = &self->state[slot];
    self->hits++;
    if (count_use) {
        if (st->uses++ == 0)
            self->pending++;
        if (wall > st->last_used)
            st->last_used = wall;
    }
    PyTuple_SET_ITEM(result, 0, Py_NewRef(st->user));
    PyTuple_SET_ITEM(result, 1, Py_NewRef(st->scopes));
    PyTuple_SET_ITEM(result, 2, without);
    PyTuple_SET_ITEM(result, 3, Py_NewRef(count_use ? Py_True : Py_False));
    return result;
}

/* -- maintenance ----------------------------------------------------------------------- */

static Py_ssize_t table_oldest(const Table *self)
{
    Py_ssize_t best = -1;
    for (Py_ssize_t i = 0; i < self->size; i++)
        if (best < 0 || self->state[i].seen < self->state[best].seen)
            best = i;
    return best;
}

/* A slot's state as Python gives it: (key_id, user, scopes, expires_at, checked_at,
 * plain). The tuple's items stay alive with the tuple the caller holds. */
typedef struct {
    PyObject *key_id, *user, *scopes;
    double expires, checked;
    uint32_t plain;
} state_args;

static int state_args_parse(PyObject *state, state_args *out)
{
    if (!PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "a state is (key_id, user, scopes, expires_at, checked_at, plain)");
        return -1;
    }
    PyObject **items = &PyTuple_GET_ITEM(state, 0);
    if (key_id_arg(items[0]) < 0 || expiry_arg(items[3], &out->expires) < 0 ||
        time_arg(items[4], &out->checked) < 0)
        return -1;
    if (!PyBool_Check(items[5])) {
        PyErr_SetString(PyExc_TypeError, "plain is a bool");
        return -1;
    }
    out->key_id = items[0];
    out->user = items[1];
    out->scopes = items[2];
    out->plain = items[5] == Py_True;
    return 0;
}

/* Replace a slot's state; the old references go to old[1..2]. */
static void state_set(slot_state *st, const state_args *a, PyObject *old[3])
{
    old[0] = NULL;
    old[1] = st->user;
    old[2] = st->scopes;
    st->user = Py_NewRef(a->user);
    st->scopes = Py_NewRef(a->scopes);
    st->expires = a->expires;
    st->checked = a->checked;
    st->plain = a->plain;
}

static PyObject *Table_insert(Table *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* insert(digest, state, now, max_size): a key's slot, new or replaced; a new key past
     * max_size takes the place of the one least recently seen. */
    uint8_t d[DIGEST_SIZE];
    state_args a;
    double now;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "insert(digest, state, now, max_size)");
        return NULL;
    }
    if (digest_arg(args[0], d) < 0 || state_args_parse(args[1], &a) < 0 ||
        time_arg(args[2], &now) < 0)
        return NULL;
    Py_ssize_t max_size = PyLong_AsSsize_t(args[3]);
    if (max_size == -1 && PyErr_Occurred())
        return NULL;
    /* No Python code runs from here until the references are dropped. */
    PyObject *evicted[3] = {NULL, NULL, NULL}, *old[3] = {NULL, NULL, NULL};
    Py_ssize_t slot = index_find(self, a.key_id);
    if (slot >= 0)
        state_set(&self->state[slot], &a, old);
    else {
        if (self->size >= max_size && self->size > 0)
            table_take(self, table_oldest(self), evicted);
        if (self->size == self->capacity && table_grow(self, self->capacity * 2) < 0) {
            drop_refs(evicted);
            return NULL;
        }
        slot = self->size;
        slot_state *st = &self->state[slot];
        memset(st, 0, sizeof *st);
        st->key_id = Py_NewRef(a.key_id);
        state_set(st, &a, old);
        self->index[index_probe(self, a.key_id, key_hash(a.key_id))] = (int32_t)slot;
        self->size = slot + 1;
    }
    memcpy(&self->tags[slot], d, TAG_SIZE);
    memcpy(self->tails[slot], d + TAG_SIZE, TAIL_SIZE);
    self->state[slot].seen = now;
    self->version++;
    drop_refs(old);
    drop_refs(evicted);
    Py_RETURN_NONE;
}

static PyObject *Table_set_state(Table *self, PyObject *state)
{
    /* set_state(state) -> whether its key is here (then its state is replaced) */
    state_args a;
    if (state_args_parse(state, &a) < 0)
        return NULL;
    Py_ssize_t slot = index_find(self, a.key_id);
    if (slot < 0)
        Py_RETURN_FALSE;
    PyObject *old[3];
    state_set(&self->state[slot], &a, old);
    self->version++;
    drop_refs(old);
    Py_RETURN_TRUE;
}

static PyObject *Table_get(Table *self, PyObject *key_id)
{
    /* get(key_id) -> (user, expires_at, checked_at) or None */
    if (key_id_arg(key_id) < 0)
        return NULL;
    Py_ssize_t slot = index_find(self, key_id);
    if (slot < 0)
        Py_RETURN_NONE;
    slot_state *st = &self->state[slot];
    return state_tuple(Py_NewRef(st->user), st->expires, st->checked);
}

static PyObject *Table_evict(Table *self, PyObject *key_id)
{
    /* evict(key_id) -> whether it was here */
    if (key_id_arg(key_id) < 0)
        return NULL;
    Py_ssize_t slot = index_find(self, key_id);
    if (slot < 0)
        Py_RETURN_FALSE;
    PyObject *refs[3];
    table_take(self, slot, refs);
    drop_refs(refs); /* last, the table whole: a finalizer may use it */
    Py_RETURN_TRUE;
}

static PyObject *Table_evict_idle(Table *self, PyObject *arg)
{
    /* evict_idle(since) -> how many slots not seen since `since` were removed */
    double since;
    if (time_arg(arg, &since) < 0)
        return NULL;
    ref_bag bag = {NULL, 0, 0};
    Py_ssize_t removed = 0;
    /* From the end: the slot moved into a removed one was looked at already. */
    for (Py_ssize_t i = self->size - 1; i >= 0; i--) {
        if (i >= self->size) /* a release without memory ran a finalizer */
            continue;
        if (self->state[i].seen < since) {
            PyObject *refs[3];
            table_take(self, i, refs);
            bag_put(&bag, refs);
            removed++;
        }
    }
    bag_release(&bag);
    return PyLong_FromSsize_t(removed);
}

static PyObject *Table_clear(Table *self, PyObject *Py_UNUSED(ignored))
{
    /* Every slot taken out before the first reference is dropped (its usage kept for the
     * next harvest): a finalizer run by a release finds an empty table, and what it
     * inserts stays. */
    ref_bag bag = {NULL, 0, 0};
    while (self->size > 0) {
        PyObject *refs[3];
        table_take(self, self->size - 1, refs);
        bag_put(&bag, refs);
    }
    bag_release(&bag);
    Py_RETURN_NONE;
}

static PyObject *Table_invalidate(Table *self, PyObject *Py_UNUSED(ignored))
{
    /* Every slot's state stale: read again before its next use. */
    for (Py_ssize_t i = 0; i < self->size; i++)
        self->state[i].checked = -Py_HUGE_VAL;
    Py_RETURN_NONE;
}

/* A list of one object per selected slot. Allocating the list may run a finalizer that
 * changes the table: then again. Once it is allocated, the references and times are taken
 * first, so the items' allocations change nothing the answer holds. */
enum { LIST_KEY_IDS_STALE, LIST_STATES };

static inline int list_selects(const slot_state *st, int what, double before)
{
    return what == LIST_STATES || st->checked < before;
}

static PyObject *table_list(Table *self, int what, double before)
{
    PyObject *out;
    Py_ssize_t n;
    for (;;) {
        n = 0;
        for (Py_ssize_t i = 0; i < self->size; i++)
            n += list_selects(&self->state[i], what, before);
        uint64_t version = self->version;
        out = PyList_New(n);
        if (out == NULL)
            return NULL;
        if (self->version == version)
            break;
        Py_DECREF(out);
    }
    if (n == 0)
        return out;
    PyObject **refs = PyMem_RawMalloc((size_t)n * sizeof *refs);
    double *times = PyMem_RawMalloc((size_t)n * 2 * sizeof *times);
    if (refs == NULL || times == NULL) {
        PyMem_RawFree(refs);
        PyMem_RawFree(times);
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0, k = 0; i < self->size; i++) {
        slot_state *st = &self->state[i];
        if (!list_selects(st, what, before))
            continue;
        refs[k] = Py_NewRef(what == LIST_KEY_IDS_STALE ? st->key_id : st->user);
        times[2 * k] = st->expires;
        times[2 * k + 1] = st->checked;
        k++;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (out == NULL) {
            Py_DECREF(refs[i]);
            continue;
        }
        PyObject *item = what == LIST_KEY_IDS_STALE
                             ? refs[i]
                             : state_tuple(refs[i], times[2 * i], times[2 * i + 1]);
        if (item == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, item);
    }
    PyMem_RawFree(refs);
    PyMem_RawFree(times);
    return out;
}

static PyObject *Table_stale(Table *self, PyObject *arg)
{
    /* stale(before) -> the key ids whose state was read before `before` */
    double before;
    if (time_arg(arg, &before) < 0)
        return NULL;
    return table_list(self, LIST_KEY_IDS_STALE, before);
}

static PyObject *Table_states(Table *self, PyObject *Py_UNUSED(ignored))
{
    /* states() -> (user, expires_at, checked_at) of every slot, in slot order */
    return table_list(self, LIST_STATES, 0.0);
}

static PyObject *Table_harvest(Table *self, PyObject *Py_UNUSED(ignored))
{
    /* harvest() -> [(key_id, last_used, uses)] counted since the last harvest, slots and
     * removed keys; their counts start again from zero. */
    Py_ssize_t n = self->n_released;
    released_use *taken = PyMem_RawMalloc((size_t)(n + self->pending + 1) * sizeof *taken);
    if (taken == NULL)
        return PyErr_NoMemory();
    if (n)
        memcpy(taken, self->released, (size_t)n * sizeof *taken);
    self->n_released = 0;
    for (Py_ssize_t i = 0; i < self->size && self->pending > 0; i++) {
        slot_state *st = &self->state[i];
        if (st->uses) {
            taken[n++] = (released_use){Py_NewRef(st->key_id), st->last_used, st->uses};
            st->uses = 0;
            self->pending--;
        }
    }
    /* The table is done with: what follows may run finalizers. */
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = NULL;
        if (out != NULL)
            item = Py_BuildValue("(OdI)", taken[i].key_id, taken[i].last_used, taken[i].uses);
        Py_DECREF(taken[i].key_id);
        if (item == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, item);
    }
    PyMem_RawFree(taken);
    return out;
}

static PyObject *Table_set_clocks(Table *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* set_clocks(monotonic, clock): what hit() reads; None: the system's clocks */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_clocks(monotonic, clock)");
        return NULL;
    }
    for (int i = 0; i < 2; i++)
        if (args[i] != Py_None && !PyCallable_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError, "a clock is a callable or None");
            return NULL;
        }
    Py_XSETREF(self->monotonic, args[0] == Py_None ? NULL : Py_NewRef(args[0]));
    Py_XSETREF(self->clock, args[1] == Py_None ? NULL : Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static int Table_contains(Table *self, PyObject *key_id)
{
    /* key_id in table: whether that key is cached */
    if (key_id_arg(key_id) < 0)
        return -1;
    return index_find(self, key_id) >= 0;
}

static Py_ssize_t Table_len(Table *self) { return self->size; }

/* Each docstring opens with its signature ("name($self, ...)\n--\n\n"), which
 * inspect.signature reads: tests/speedups/test_speedups_stub.py holds _speedups.pyi to it. */
static PyMethodDef Table_methods[] = {
    {"hit", (PyCFunction)(void (*)(void))Table_hit, METH_FASTCALL,
     "hit($self, headers, header_name, prefixes, count, /)\n--\n\n"
     "(user, auth_scopes, headers without credentials, counted), or None to let Python "
     "decide"},
    {"digest", (PyCFunction)Table_digest, METH_O,
     "digest($self, token, /)\n--\n\nThe keyed digest of token"},
    {"lookup", (PyCFunction)(void (*)(void))Table_lookup, METH_FASTCALL,
     "lookup($self, digest, now, /)\n--\n\n"
     "(user, expires_at, checked_at) or None (constant-time scan)"},
    {"insert", (PyCFunction)(void (*)(void))Table_insert, METH_FASTCALL,
     "insert($self, digest, state, now, max_size, /)\n--\n\n"
     "Cache a key, or replace its slot; state is (key_id, user, scopes, expires_at, "
     "checked_at, plain)"},
    {"set_state", (PyCFunction)Table_set_state, METH_O,
     "set_state($self, state, /)\n--\n\nReplace a cached key's state; whether it is cached"},
    {"get", (PyCFunction)Table_get, METH_O,
     "get($self, key_id, /)\n--\n\n(user, expires_at, checked_at) or None"},
    {"evict", (PyCFunction)Table_evict, METH_O,
     "evict($self, key_id, /)\n--\n\nRemove a key; whether it was cached"},
    {"evict_idle", (PyCFunction)Table_evict_idle, METH_O,
     "evict_idle($self, since, /)\n--\n\nRemove the keys not seen since since; how many"},
    {"clear", (PyCFunction)Table_clear, METH_NOARGS, "clear($self, /)\n--\n\nRemove every key"},
    {"invalidate", (PyCFunction)Table_invalidate, METH_NOARGS,
     "invalidate($self, /)\n--\n\nMake every key's state stale"},
    {"stale", (PyCFunction)Table_stale, METH_O,
     "stale($self, before, /)\n--\n\nThe key ids whose state was read before before"},
    {"states", (PyCFunction)Table_states, METH_NOARGS,
     "states($self, /)\n--\n\n(user, expires_at, checked_at) of every key, in slot order"},
    {"harvest", (PyCFunction)Table_harvest, METH_NOARGS,
     "harvest($self, /)\n--\n\n(key_id, last_used, uses) counted since the last harvest"},
    {"set_clocks", (PyCFunction)(void (*)(void))Table_set_clocks, METH_FASTCALL,
     "set_clocks($self, monotonic, clock, /)\n--\n\nThe clocks hit() reads (None: the "
     "system's)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Table_members[] = {
    {"ttl", T_DOUBLE, offsetof(Table, ttl), 0, "Seconds a state may be old on a hit"},
    {"count_uses", T_BOOL, offsetof(Table, count_uses), 0, "hit() counts plain slots' uses"},
    {"minute_end", T_DOUBLE, offsetof(Table, minute_end), 0,
     "hit() declines to count a use at or past this wall-clock time"},
    {"pending_limit", T_PYSSIZET, offsetof(Table, pending_limit), 0,
     "hit() declines to make more slots pending than this"},
    {"hits", T_ULONGLONG, offsetof(Table, hits), READONLY, "Hits answered by hit()"},
    {"pending", T_PYSSIZET, offsetof(Table, pending), READONLY, "Slots with uses counted"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods Table_as_sequence = {
    .sq_length = (lenfunc)Table_len,
    .sq_contains = (objobjproc)Table_contains,
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "keystile._speedups.Table",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Table(key, max_token_length)\n--\n\n"
              "The verified-key cache: tags, digests, each key's state and usage.",
    .tp_new = Table_new,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_traverse = (traverseproc)Table_traverse,
    .tp_clear = (inquiry)Table_clear_refs,
    .tp_methods = Table_methods,
    .tp_members = Table_members,
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

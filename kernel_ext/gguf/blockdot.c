/* Products on GGUF's own quantised blocks with 8-bit activations, and the small steps of a
 * decoder layer around them (decode_mode "quantized" of kernel_ext).
 *
 * Built on the machine that runs it by kernel_ext/gguf/blockdot.py (cc -O3 -march=native
 * -fopenmp, into the user cache, keyed by this file, the compiler and the CPU), loaded with
 * ctypes.
 *
 *   y[m][r] = sum over the row's blocks of  W_block(r) . X_block(m)
 *
 * X is quantised per block of 32 values as llama.cpp quantises activations (Q8_0: int8 values
 * and one scale, max|x|/127, kept here in float32), and the remainder once more with a 256x
 * finer scale (quantize_row). The weight blocks are read as they are in the GGUF file (the map,
 * or a copy with permuted rows); each level's dot product with a block is exact in int32, the
 * two are combined as 256 p1 + p2 and scaled in float32. Supported: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
 * Q4_K Q5_K Q6_K.
 *
 * With AVX2/FMA/F16C (and AVX-512 VNNI where present) the blocks are unpacked into 32 int8
 * lanes and multiplied with vpdpbusd (or maddubs/madd), accumulating 8 float lanes per row;
 * other CPUs run a portable C version of the same arithmetic. Rows are split across OpenMP
 * threads (the libgomp torch already loaded, so no second thread pool).
 *
 * Also here: bd_layer_step (one token through a whole layer: norms, rotary, the KV write and
 * attention, the gated activation, residuals), and the LM head certificate's scans and exact
 * rows (kernel_ext/providers/head.py).
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

#define QK 32

/* ggml type ids */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

static inline float fp16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, f;
    if (exp == 0) {
        if (mant == 0) {
            f = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            mant &= 0x3ff;
            f = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        f = sign | 0x7f800000u | (mant << 13);
    } else {
        f = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float out;
    memcpy(&out, &f, 4);
    return out;
}

/* ---- activations ------------------------------------------------------------------------- */
/* Each block of 32 values is rounded to int8 twice: q1 with the scale d = max|x|/127 (llama.cpp's
 * Q8_0), then the remainder x - d q1 (at most d/2) as q2 with the scale d/256 (clamped to
 * +-127). The products are exact integer sums for each level, combined as 256 p1 + p2 in int32,
 * so the activations count with ~16 bits (an error of at most max|x| / 32512 per value) for one
 * more integer product per block. */
#define LEVEL2 (1.0f / 256.0f)

/* x (K floats) -> q (2K int8: q1 then q2), d (K/32 floats), s (2 K/32 int32: the sums of each
 * block's q1, then of its q2) */
static void quantize_row(const float *x, int K, int8_t *q, float *d, int32_t *s) {
    int nb = K / QK;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        float scale2 = scale * LEVEL2, inv2 = scale2 > 0.0f ? 1.0f / scale2 : 0.0f;
        int32_t sum = 0, sum2 = 0;
        for (int i = 0; i < QK; i++) {
            int v = (int)nearbyintf(xb[i] * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            int v2 = (int)nearbyintf((xb[i] - scale * (float)v) * inv2);
            v2 = v2 > 127 ? 127 : (v2 < -127 ? -127 : v2);
            q[b * QK + i] = (int8_t)v;
            q[K + b * QK + i] = (int8_t)v2;
            sum += v;
            sum2 += v2;
        }
        d[b] = scale;
        s[b] = sum;
        s[nb + b] = sum2;
    }
}

/* the activations as the products see them: d q1 + (d / 256) q2 (for error bounds and tests) */
void bd_q8_roundtrip(const float *x, int K, float *out) {
    int8_t q[2 * K];
    float d[K / QK];
    int32_t s[2 * (K / QK)];
    quantize_row(x, K, q, d, s);
    for (int i = 0; i < K; i++)
        out[i] = d[i / QK] * (float)q[i] + (d[i / QK] * LEVEL2) * (float)q[K + i];
}

/* ---- one 32-value block: 16 int32 lanes of pairwise products -------------------------------- */
static inline void pairs(const int8_t *w, const int8_t *x, int32_t *p) {
    for (int j = 0; j < 16; j++)
        p[j] = (int32_t)w[2 * j] * x[2 * j] + (int32_t)w[2 * j + 1] * x[2 * j + 1];
}

static inline void acc16(float *acc, const int32_t *p, float scale) {
    for (int j = 0; j < 16; j++) acc[j] += (float)p[j] * scale;
}

/* ---- unpacking a block of a row to int8 (32 values), its scale, and its minimum ------------- */
typedef struct {
    int8_t w[QK];
    float scale;      /* value = scale * w + minv  (per block of 32) ...                   */
    float minv;
    float scale2;     /* ... Q6_K: the second 16 values' scale (scale: the first 16's)      */
    int two;          /* 1: scale2 applies to w[16..31]                                     */
} blk;

/* the 32 values of a Q5_0/Q5_1 block: low nibbles qs, fifth bits qh, less `offset` */
static inline void five_bits(const uint8_t *qs, const uint8_t *qh_bytes, int offset, int8_t *w) {
    uint32_t qh;
    memcpy(&qh, qh_bytes, 4);
    for (int i = 0; i < 16; i++) {
        w[i] = (int8_t)(((qs[i] & 15) | (((qh >> i) & 1) << 4)) - offset);
        w[i + 16] = (int8_t)(((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - offset);
    }
}

static inline void unpack(int type, const uint8_t *row, int b, blk *o) {
    int i;
    o->minv = 0.0f;
    o->scale2 = 0.0f;
    o->two = 0;
    switch (type) {
    case T_Q4_0: {
        const uint8_t *p = row + b * 18, *qs = p + 2;
        o->scale = fp16(p);
        for (i = 0; i < 16; i++) { o->w[i] = (int8_t)((qs[i] & 15) - 8); o->w[i + 16] = (int8_t)((qs[i] >> 4) - 8); }
        break;
    }
    case T_Q4_1: {
        const uint8_t *p = row + b * 20, *qs = p + 4;
        o->scale = fp16(p);
        o->minv = fp16(p + 2);
        for (i = 0; i < 16; i++) { o->w[i] = (int8_t)(qs[i] & 15); o->w[i + 16] = (int8_t)(qs[i] >> 4); }
        break;
    }
    case T_Q5_0: {
        const uint8_t *p = row + b * 22;
        o->scale = fp16(p);
        five_bits(p + 6, p + 2, 16, o->w);
        break;
    }
    case T_Q5_1: {
        const uint8_t *p = row + b * 24;
        o->scale = fp16(p);
        o->minv = fp16(p + 2);
        five_bits(p + 8, p + 4, 0, o->w);
        break;
    }
    case T_Q8_0: {
        const uint8_t *p = row + b * 34;
        o->scale = fp16(p);
        memcpy(o->w, p + 2, QK);
        break;
    }
    case T_Q4_K:
    case T_Q5_K: {
        int sb = b / 8, j = b % 8, five = type == T_Q5_K;
        const uint8_t *p = row + sb * (five ? 176 : 144), *sc = p + 4;
        const uint8_t *qs = p + (five ? 48 : 16) + 32 * (j / 2), *qh = p + 16;
        int shift = 4 * (j & 1);
        uint8_t s, m;
        if (j < 4) { s = sc[j] & 63; m = sc[j + 4] & 63; }
        else { s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4); m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4); }
        o->scale = fp16(p) * (float)s;
        o->minv = -fp16(p + 2) * (float)m;
        if (five) {
            for (i = 0; i < QK; i++) o->w[i] = (int8_t)(((qs[i] >> shift) & 15) | (((qh[i] >> j) & 1) << 4));
        } else {
            for (i = 0; i < QK; i++) o->w[i] = (int8_t)((qs[i] >> shift) & 15);
        }
        break;
    }
    case T_Q6_K: {
        int sb = b / 8, j = b % 8, n = j / 4, qd = j % 4;
        const uint8_t *p = row + sb * 210;
        const uint8_t *ql = p + n * 64 + (qd & 1) * 32, *qh = p + 128 + n * 32;
        const int8_t *sc = (const int8_t *)(p + 192) + n * 8 + 2 * qd;
        float d = fp16(p + 208);
        int shift = 4 * (qd >> 1), hs = 2 * qd;
        for (i = 0; i < QK; i++)
            o->w[i] = (int8_t)((((ql[i] >> shift) & 15) | (((qh[i] >> hs) & 3) << 4)) - 32);
        o->scale = d * (float)sc[0];
        o->scale2 = d * (float)sc[1];
        o->two = 1;
        break;
    }
    default: /* not reached: types are checked before (bd_row_bytes) */
        memset(o, 0, sizeof *o);
        break;
    }
}

static int block_values(int type) { return (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K) ? 256 : 32; }

static int block_bytes(int type) {
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    }
    return 0;
}

/* bytes of one row of K values of `type`, or 0 when the type or K is not supported */
long bd_row_bytes(int type, int K) {
    int n = block_values(type), b = block_bytes(type);
    if (!b || K <= 0 || K % n) return 0;
    return (long)(K / n) * b;
}

/* ---- the small steps of a decoder layer around the products (decode_mode "quantized") ------ */
/* out = x * rsqrt(mean(x^2) + eps) * w   (w: the norm's weight, Gemma's 1 + w folded in) */
static void rms_norm(const float *x, const float *w, int K, float eps, float *out) {
    double ss = 0.0;
    #pragma omp simd reduction(+:ss)
    for (int i = 0; i < K; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / K) + eps);
    for (int i = 0; i < K; i++) out[i] = x[i] * r * w[i];
}

/* h += rms_norm(a) * w  (w NULL: h += a) */
void bd_add_norm(float *h, const float *a, const float *w, int K, float eps) {
    if (!w) {
        for (int i = 0; i < K; i++) h[i] += a[i];
        return;
    }
    float t[K];
    rms_norm(a, w, K, eps, t);
    for (int i = 0; i < K; i++) h[i] += t[i];
}

/* per head of x (heads x D, in place): an RMS norm with weight w (NULL: none), then rotary
 * x * cos + roll(x, D/2) * sin, with sin's first half negated (rotate_half) */
void bd_norm_rope(float *x, int heads, int D, const float *w, float eps, const float *cos,
                  const float *sin) {
    int half = D / 2;
    float t[D];
    for (int h = 0; h < heads; h++) {
        float *v = x + (long)h * D;
        if (w) rms_norm(v, w, D, eps, v);
        for (int i = 0; i < D; i++) t[i] = v[i] * cos[i] + v[(i + half) % D] * sin[i];
        memcpy(v, t, sizeof(float) * D);
    }
}

/* one query position: the new key and value (kv_heads x D each) are stored at slot `at` of
 * the cache (kv_heads x slots x D; and at slot `at2` too when >= 0: a sliding window's doubled
 * ring), then out (heads x D) = softmax(q . K^T * scale) V over slots [lo, hi), one query-head
 * group per key head */
void bd_attend(const float *q, int heads, int kv_heads, int D, float *keys, float *values,
               long slots, const float *k_new, const float *v_new, int at, int at2, int lo,
               int hi, float scale, float *out) {
    for (int g = 0; g < kv_heads; g++) {
        for (int c = 0; c < 2; c++) {
            int slot = c ? at2 : at;
            if (slot < 0) continue;
            memcpy(keys + ((long)g * slots + slot) * D, k_new + (long)g * D, sizeof(float) * D);
            memcpy(values + ((long)g * slots + slot) * D, v_new + (long)g * D, sizeof(float) * D);
        }
    }
    int group = heads / kv_heads, n = hi - lo;
    float w[n > 0 ? n : 1];
    for (int h = 0; h < heads; h++) {
        const float *qh = q + (long)h * D;
        const float *kh = keys + (long)(h / group) * slots * D;
        const float *vh = values + (long)(h / group) * slots * D;
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float *k = kh + (long)(lo + j) * D;
            float s = 0.0f;
            #pragma omp simd reduction(+:s)
            for (int i = 0; i < D; i++) s += qh[i] * k[i];
            w[j] = s * scale;
            mx = w[j] > mx ? w[j] : mx;
        }
        float sum = 0.0f;
        for (int j = 0; j < n; j++) { w[j] = expf(w[j] - mx); sum += w[j]; }
        float *o = out + (long)h * D;
        for (int i = 0; i < D; i++) o[i] = 0.0f;
        for (int j = 0; j < n; j++) {
            const float *v = vh + (long)(lo + j) * D;
            float c = w[j] / sum;
            for (int i = 0; i < D; i++) o[i] += c * v[i];
        }
    }
}

/* ---- scans of a logit row (the LM head's certificate, kernel_ext/providers/head.py) -------- */
/* the first index of the largest value of a[0..n), its value in *hi and the smallest in *lo;
 * -1 when a value is not finite */
long bd_scan(const float *a, long n, float *lo, float *hi) {
    float mn = INFINITY, mx = -INFINITY;
    int finite = 1;
    #pragma omp simd reduction(min:mn) reduction(max:mx) reduction(&:finite)
    for (long i = 0; i < n; i++) {
        mn = a[i] < mn ? a[i] : mn;
        mx = a[i] > mx ? a[i] : mx;
        finite &= (a[i] - a[i]) == 0.0f; /* false for inf and nan */
    }
    *lo = mn;
    *hi = mx;
    if (!finite) return -1;
    for (long i = 0; i < n; i++)
        if (a[i] == mx) return i;
    return -1;
}

/* the indexes i (ascending) with a[i] >= t, at most cap of them written to out; their count */
long bd_select_ge(const float *a, long n, float t, long *out, long cap) {
    long c = 0;
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        int any = 0;
        #pragma omp simd reduction(|:any)
        for (int j = 0; j < 16; j++) any |= a[i + j] >= t;
        if (!any) continue;
        for (int j = 0; j < 16; j++)
            if (a[i + j] >= t) { if (c < cap) out[c] = i + j; c++; }
    }
    for (; i < n; i++)
        if (a[i] >= t) { if (c < cap) out[c] = i; c++; }
    return c;
}

/* the certificate's rows: among the r with a[r] >= t, those whose bound
 * a[r] + u |a[r]| + cw wn[r] + ce en[r] (in double) reaches thr, ascending, at most cap written
 * to out; their count is returned, *ncand counts the r with a[r] >= t and *outside is the largest
 * bound of those that did not reach thr (-inf: none) */
long bd_cert_rows(const float *a, long n, float t, const float *wn, const float *en, double u,
                  double cw, double ce, double thr, long *out, long cap, long *ncand,
                  double *outside) {
    long c = 0, nc = 0;
    double out_max = -INFINITY;
    long i = 0;
    for (; i < n; i += 16) {
        int any = 0, m = n - i < 16 ? (int)(n - i) : 16;
        #pragma omp simd reduction(|:any)
        for (int j = 0; j < m; j++) any |= a[i + j] >= t;
        if (!any) continue;
        for (int j = 0; j < m; j++) {
            long r = i + j;
            if (!(a[r] >= t)) continue;
            nc++;
            double v = a[r], bound = v + u * fabs(v) + cw * wn[r] + ce * en[r];
            if (bound >= thr) {
                if (c < cap) out[c] = r;
                c++;
            } else if (bound > out_max) {
                out_max = bound;
            }
        }
    }
    *ncand = nc;
    *outside = out_max;
    return c;
}

/* ---- whole rows in float32 (the certificate's exact rows) ---------------------------------- */
static inline void dequant_row(int type, const uint8_t *row, int K, float *out) {
    for (int b = 0; b < K / QK; b++) {
        blk k;
        unpack(type, row, b, &k);
        for (int i = 0; i < QK; i++) {
            float sc = (k.two && i >= 16) ? k.scale2 : k.scale;
            out[b * QK + i] = k.minv == 0.0f ? sc * (float)k.w[i] : sc * (float)k.w[i] + k.minv;
        }
    }
}

/* rows[0..n) of W as float32 (n x K), as the blocks define them */
void bd_rows_dequant(int type, const uint8_t *W, long row_bytes, int K, const long *rows, long n,
                     float *out) {
    for (long r = 0; r < n; r++) dequant_row(type, W + rows[r] * row_bytes, K, out + r * K);
}

/* out[r] = h . row rows[r] of W, in float32 */
void bd_rows_dot(int type, const uint8_t *W, long row_bytes, int K, const long *rows, long n,
                 const float *h, float *out) {
    #pragma omp parallel for schedule(static) if (n >= 256)
    for (long r = 0; r < n; r++) {
        float v[K];
        dequant_row(type, W + rows[r] * row_bytes, K, v);
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (int i = 0; i < K; i++) s += h[i] * v[i];
        out[r] = s;
    }
}

#define MAXM 64 /* activation rows per pass over the weights (a prompt's chunk) */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set (llama.cpp's bytes_from_bits_32) */
static inline __m256i bits32(const uint8_t *x) {
    uint32_t v;
    memcpy(&v, x, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles first, then high ones */
static inline __m256i nibbles32(const uint8_t *qs) {
    __m128i t = _mm_loadu_si128((const __m128i *)qs);
    __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

/* signed int8 w times signed int8 x, 32 values: 8 int32 lanes (lane j: values 4j..4j+3) */
static inline __m256i dot8(__m256i w, __m256i x) {
    __m256i aw = _mm256_sign_epi8(w, w), sx = _mm256_sign_epi8(x, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#else
    __m256i p16 = _mm256_maddubs_epi16(aw, sx);
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#else
#define VNNI 0
#endif

/* unsigned int8 w (at most 31 without VNNI: pairs of products must fit int16) times signed x */
static inline __m256i dotu(__m256i w, __m256i x) {
#if VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

/* whether load_block gives `type`'s values unsigned (with their offset in minv) */
#define UNSIGNED(type) ((type) != T_Q6_K && ((type) != T_Q8_0 || VNNI))

static inline float hsum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* block b of a row: int8 values; `sc` the scale of each int32 lane; `minv` the block's offset */
static inline __attribute__((always_inline)) __m256i load_block(
        int type, const uint8_t *row, int b, __m256 *sc, float *minv) {
    __m256i w;
    *minv = 0.0f;
    switch (type) {
    case T_Q4_0: {
        const uint8_t *p = row + b * 18;
        float dw = h2f(p);
        *sc = _mm256_set1_ps(dw);
        *minv = -8.0f * dw;  /* d (q - 8) = d q - 8 d */
        w = nibbles32(p + 2);
        break;
    }
    case T_Q4_1: {
        const uint8_t *p = row + b * 20;
        *sc = _mm256_set1_ps(h2f(p));
        *minv = h2f(p + 2);
        w = nibbles32(p + 4);
        break;
    }
    case T_Q5_0: {
        const uint8_t *p = row + b * 22;
        float dw = h2f(p);
        *sc = _mm256_set1_ps(dw);
        *minv = -16.0f * dw;  /* d (q - 16) = d q - 16 d */
        __m256i hi = _mm256_and_si256(bits32(p + 2), _mm256_set1_epi8(0x10));
        w = _mm256_or_si256(nibbles32(p + 6), hi);
        break;
    }
    case T_Q5_1: {
        const uint8_t *p = row + b * 24;
        *sc = _mm256_set1_ps(h2f(p));
        *minv = h2f(p + 2);
        __m256i hi = _mm256_and_si256(bits32(p + 4), _mm256_set1_epi8(0x10));
        w = _mm256_or_si256(nibbles32(p + 8), hi);
        break;
    }
    case T_Q8_0: {
        const uint8_t *p = row + b * 34;
        float dw = h2f(p);
        *sc = _mm256_set1_ps(dw);
        w = _mm256_loadu_si256((const __m256i *)(p + 2));
        if (VNNI) { /* q + 128 unsigned: d q = d (q + 128) - 128 d */
            w = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
            *minv = -128.0f * dw;
        }
        break;
    }
    default: /* the K types go through k_values */
        w = _mm256_setzero_si256();
        *sc = _mm256_setzero_ps();
        break;
    }
    return w;
}

/* the 8 sub-blocks' scales and minima of a Q4_K/Q5_K super-block, as floats */
static inline void k_scales(const uint8_t *p, float *sc, float *mn) {
    const uint8_t *s = p + 4;
    float d = h2f(p), dmin = h2f(p + 2);
    for (int j = 0; j < 4; j++) {
        sc[j] = d * (float)(s[j] & 63);
        mn[j] = -dmin * (float)(s[j + 4] & 63);
        sc[j + 4] = d * (float)((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
        mn[j + 4] = -dmin * (float)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

/* sub-block j of a Q4_K/Q5_K/Q6_K super-block at p: int8 values */
static inline __attribute__((always_inline)) __m256i k_values(int type, const uint8_t *p, int j) {
    if (type == T_Q6_K) {
        int n = j / 4, qd = j % 4;
        __m256i l = _mm256_loadu_si256((const __m256i *)(p + n * 64 + (qd & 1) * 32));
        l = _mm256_and_si256(_mm256_srl_epi16(l, _mm_cvtsi32_si128(4 * (qd >> 1))), _mm256_set1_epi8(0x0F));
        __m256i h = _mm256_loadu_si256((const __m256i *)(p + 128 + n * 32));
        h = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * qd)), _mm256_set1_epi8(3));
        return _mm256_sub_epi8(_mm256_or_si256(l, _mm256_slli_epi16(h, 4)), _mm256_set1_epi8(32));
    }
    int five = type == T_Q5_K;
    __m256i q = _mm256_loadu_si256((const __m256i *)(p + (five ? 48 : 16) + 32 * (j / 2)));
    q = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(4 * (j & 1))), _mm256_set1_epi8(0x0F));
    if (five) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(p + 16));
        h = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
        q = _mm256_or_si256(q, _mm256_slli_epi16(h, 4));
    }
    return q;
}

/* a block's two products (w times q1 and q2 of activation block b), combined as 256 p1 + p2,
 * into the chain A scaled by the block's scale times d (A is divided by 256 at the end) */
#define ACC2(type, w, scv, b, A) do { \
        __m256i x1_ = _mm256_loadu_si256((const __m256i *)(qm + (b) * QK)); \
        __m256i x2_ = _mm256_loadu_si256((const __m256i *)(qm + K + (b) * QK)); \
        __m256i p1_ = UNSIGNED(type) ? dotu((w), x1_) : dot8((w), x1_); \
        __m256i p2_ = UNSIGNED(type) ? dotu((w), x2_) : dot8((w), x2_); \
        __m256i p_ = _mm256_add_epi32(_mm256_slli_epi32(p1_, 8), p2_); \
        (A) = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p_), _mm256_mul_ps((scv), _mm256_set1_ps(dm[b])), (A)); \
    } while (0)

/* a block's offset (the minimum of Q4_1, Q5_1, Q4_K, Q5_K; the zero point of unsigned values)
 * times the activation block's sum */
#define MIN2(minv, b) ((minv) * dm[b] * ((float)sm[b] + LEVEL2 * (float)sm[nb + (b)]))
#define HAS_MIN(type) ((type) == T_Q4_1 || (type) == T_Q5_1 || (type) == T_Q4_K || \
                       (type) == T_Q5_K || (type) == T_Q4_0 || (type) == T_Q5_0 || \
                       ((type) == T_Q8_0 && VNNI))

/* rows [r0, r1) of W times activation row m: y[r] */
static inline __attribute__((always_inline)) void rows_typed(
        int type, const uint8_t *W, long row_bytes, int K, int r0, int r1,
        const int8_t *qm, const float *dm, const int32_t *sm, float *y) {
    int nb = K / QK;
    int has_min = HAS_MIN(type);
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = W + (long)r * row_bytes;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        float mins = 0.0f;
        if (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K) {
            int sb_bytes = type == T_Q4_K ? 144 : (type == T_Q5_K ? 176 : 210);
            for (int sb = 0; sb < nb / 8; sb++) {
                const uint8_t *p = row + (long)sb * sb_bytes;
                float sc[16], mn[8];
                if (type == T_Q6_K) {
                    const int8_t *s6 = (const int8_t *)(p + 192);
                    float d6 = h2f(p + 208);
                    for (int i = 0; i < 16; i++) sc[i] = d6 * (float)s6[i];
                } else {
                    k_scales(p, sc, mn);
                }
                for (int j = 0; j < 8; j += 2) {
                    int b = sb * 8 + j;
                    __m256i w0 = k_values(type, p, j), w1 = k_values(type, p, j + 1);
                    __m256 s0, s1;
                    if (type == T_Q6_K) {
                        int at = (j / 4) * 8 + 2 * (j % 4);
                        s0 = _mm256_setr_m128(_mm_set1_ps(sc[at]), _mm_set1_ps(sc[at + 1]));
                        s1 = _mm256_setr_m128(_mm_set1_ps(sc[at + 2]), _mm_set1_ps(sc[at + 3]));
                    } else {
                        s0 = _mm256_set1_ps(sc[j]);
                        s1 = _mm256_set1_ps(sc[j + 1]);
                    }
                    ACC2(type, w0, s0, b, a0);
                    ACC2(type, w1, s1, b + 1, a1);
                    if (has_min) mins += MIN2(mn[j], b) + MIN2(mn[j + 1], b + 1);
                }
            }
        } else {
            int b = 0;
            for (; b + 1 < nb; b += 2) {
                __m256 s0, s1;
                float m0, m1;
                __m256i w0 = load_block(type, row, b, &s0, &m0);
                __m256i w1 = load_block(type, row, b + 1, &s1, &m1);
                ACC2(type, w0, s0, b, a0);
                ACC2(type, w1, s1, b + 1, a1);
                if (has_min) mins += MIN2(m0, b) + MIN2(m1, b + 1);
            }
            for (; b < nb; b++) {
                __m256 s0;
                float m0;
                __m256i w0 = load_block(type, row, b, &s0, &m0);
                ACC2(type, w0, s0, b, a0);
                if (has_min) mins += MIN2(m0, b);
            }
        }
        y[r] = LEVEL2 * hsum(_mm256_add_ps(a0, a1)) + mins;
    }
}

#define MG 4 /* activation rows sharing one unpacking of a weight block */

/* rows [r0, r1) of W times MG activation rows (a prompt): each block is unpacked once */
static inline __attribute__((always_inline)) void rows_group(
        int type, const uint8_t *W, long row_bytes, int K, int r0, int r1,
        const int8_t *q, const float *d, const int32_t *s, float *y, long ldy) {
    int nb = K / QK;
    int has_min = HAS_MIN(type);
    int kq = type == T_Q4_K || type == T_Q5_K || type == T_Q6_K;
    int sb_bytes = type == T_Q4_K ? 144 : (type == T_Q5_K ? 176 : 210);
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = W + (long)r * row_bytes;
        __m256 A[MG];
        float mins[MG];
        for (int m = 0; m < MG; m++) { A[m] = _mm256_setzero_ps(); mins[m] = 0.0f; }
        float sc[16], mn[8];
        for (int b = 0; b < nb; b++) {
            __m256i w;
            __m256 scv;
            float minv = 0.0f;
            if (kq) {
                int j = b % 8;
                const uint8_t *p = row + (long)(b / 8) * sb_bytes;
                if (j == 0) {
                    if (type == T_Q6_K) {
                        const int8_t *s6 = (const int8_t *)(p + 192);
                        float d6 = h2f(p + 208);
                        for (int i = 0; i < 16; i++) sc[i] = d6 * (float)s6[i];
                    } else {
                        k_scales(p, sc, mn);
                    }
                }
                w = k_values(type, p, j);
                if (type == T_Q6_K) {
                    int at = (j / 4) * 8 + 2 * (j % 4);
                    scv = _mm256_setr_m128(_mm_set1_ps(sc[at]), _mm_set1_ps(sc[at + 1]));
                } else {
                    scv = _mm256_set1_ps(sc[j]);
                    minv = mn[j];
                }
            } else {
                w = load_block(type, row, b, &scv, &minv);
            }
            for (int m = 0; m < MG; m++) {
                const int8_t *qm = q + (long)m * 2 * K;
                const float *dm = d + (long)m * nb;
                const int32_t *sm = s + (long)m * 2 * nb;
                ACC2(type, w, scv, b, A[m]);
                if (has_min) mins[m] += MIN2(minv, b);
            }
        }
        for (int m = 0; m < MG; m++)
            y[(long)m * ldy + r] = LEVEL2 * hsum(A[m]) + mins[m];
    }
}

/* rows [r0, r1) of W (N rows of `row_bytes`) times M quantised activation rows (q: 2K values a
 * row, d: K/32, s: 2 K/32): groups of MG rows share each block's unpacking, the rest one by one */
static inline __attribute__((always_inline)) void rows_m(
        int type, const uint8_t *W, long row_bytes, int K, int r0, int r1,
        const int8_t *q, const float *d, const int32_t *s, int M, float *y, long ldy) {
    int nb = K / QK, m = 0;
    for (; m + MG <= M; m += MG)
        rows_group(type, W, row_bytes, K, r0, r1, q + (long)m * 2 * K, d + (long)m * nb,
                   s + (long)m * 2 * nb, y + (long)m * ldy, ldy);
    for (; m < M; m++)
        rows_typed(type, W, row_bytes, K, r0, r1, q + (long)m * 2 * K, d + (long)m * nb,
                   s + (long)m * 2 * nb, y + (long)m * ldy);
}

static void rows_times(int type, const uint8_t *W, long row_bytes, int K, int r0, int r1,
                       const int8_t *q, const float *d, const int32_t *s, int M,
                       float *y, long ldy) {
    switch (type) { /* one specialised loop per type */
    case T_Q4_0: rows_m(T_Q4_0, W, row_bytes, K, r0, r1, q, d, s, M, y, ldy); break;
    case T_Q4_1: rows_m(T_Q4_1, W, row_bytes, K, r0, r1, q, d, s, M, y, ldy); break;
    case T_Q5_0: rows_m(T_Q5_0, W, row_bytes, K, r0, r1, q, d, s, M, y, ldy); break;
    case T_Q5_1: rows_m(T_Q5_1, W, row_bytes, K, r0, r1, q, d, s, M, y, ldy); break;
    case T_Q8_0: rows_m(T_Q8_0, W, row_bytes, K, r0, r1, q, d, s, M, y, ldy); break;
    case T_Q4_K: rows_m(T_Q4_K, W, row_bytes, K, r0, r1, q, d, s, M, y, ldy); break;
    case T_Q5_K: rows_m(T_Q5_K, W, row_bytes, K, r0, r1, q, d, s, M, y, ldy); break;
    case T_Q6_K: rows_m(T_Q6_K, W, row_bytes, K, r0, r1, q, d, s, M, y, ldy); break;
    }
}

#else /* portable C: the same arithmetic, one block at a time */

/* rows [r0, r1) of W (N rows of `row_bytes`) times M quantised activation rows */
static void rows_times(int type, const uint8_t *W, long row_bytes, int K, int r0, int r1,
                       const int8_t *q, const float *d, const int32_t *s, int M,
                       float *y, long ldy) {
    int nb = K / QK;
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = W + (long)r * row_bytes;
        for (int m = 0; m < M; m++) {
            const int8_t *qm = q + (long)m * 2 * K;
            const float *dm = d + (long)m * nb;
            const int32_t *sm = s + (long)m * 2 * nb;
            float acc[2][16], mins = 0.0f;
            memset(acc, 0, sizeof(acc));
            for (int b = 0; b < nb; b++) {
                blk k;
                unpack(type, row, b, &k);
                for (int level = 0; level < 2; level++) {
                    int32_t p[16];
                    pairs(k.w, qm + level * K + b * QK, p);
                    if (k.two) {
                        float sa = k.scale * dm[b], sb = k.scale2 * dm[b];
                        for (int j = 0; j < 8; j++) acc[level][j] += (float)p[j] * sa;
                        for (int j = 8; j < 16; j++) acc[level][j] += (float)p[j] * sb;
                    } else {
                        acc16(acc[level], p, k.scale * dm[b]);
                    }
                }
                mins += k.minv * dm[b] * ((float)sm[b] + LEVEL2 * (float)sm[nb + b]);
            }
            float t0 = 0.0f, t1 = 0.0f;
            for (int j = 0; j < 16; j++) { t0 += acc[0][j]; t1 += acc[1][j]; }
            y[(long)m * ldy + r] = t0 + LEVEL2 * t1 + mins;
        }
    }
}

#endif

#define MAXW 8 /* weights per call */

/* n weights that read the same input, in one call: y_i (M x ldy_i floats, columns [0, N_i)) =
 * x (M x K floats) times W_i^T, W_i: N_i rows of GGUF blocks of types[i]. The activations are
 * quantised once (after an RMS norm with weight `norm`, when not NULL); the rows of all weights
 * are split across `threads` threads. Returns 0, -1 when a type, K or n is not supported, -2 when
 * the activations' buffers cannot be allocated. */
int bd_matmul_n(int n, const int *types, const uint8_t *const *W, const long *row_bytes,
                const int *N, int K, const float *x, int M, float *const *y, const long *ldy,
                int threads, const float *norm, float eps) {
    if (n < 1 || n > MAXW || K % QK) return -1;
    int first[MAXW + 1], total_rows = 0;
    first[0] = 0;
    for (int i = 0; i < n; i++) {
        if (bd_row_bytes(types[i], K) != row_bytes[i] || N[i] < 0) return -1;
        first[i + 1] = first[i] + (N[i] + 15) / 16; /* tiles of 16 rows */
        total_rows += N[i];
    }
    int nb = K / QK, tiles = first[n];
    int rows_max = M < MAXM ? M : MAXM;
    int8_t *q = malloc((size_t)rows_max * 2 * K);
    float *d = malloc(sizeof(float) * (size_t)rows_max * nb);
    int32_t *s = malloc(sizeof(int32_t) * (size_t)rows_max * 2 * nb);
    if (!q || !d || !s) {
        free(q); free(d); free(s);
        return -2;
    }
    for (int m0 = 0; m0 < M; m0 += MAXM) {
        int mm = M - m0 < MAXM ? M - m0 : MAXM;
        for (int m = 0; m < mm; m++) {
            const float *xm = x + (long)(m0 + m) * K;
            float normed[norm ? K : 1];
            if (norm) {
                rms_norm(xm, norm, K, eps, normed);
                xm = normed;
            }
            quantize_row(xm, K, q + (long)m * 2 * K, d + (long)m * nb, s + (long)m * 2 * nb);
        }
        #pragma omp parallel for schedule(static) num_threads(threads) if (total_rows >= 64 && threads > 1)
        for (int t = 0; t < tiles; t++) {
            int i = 0;
            while (t >= first[i + 1]) i++;
            int r0 = (t - first[i]) * 16, r1 = r0 + 16 < N[i] ? r0 + 16 : N[i];
            rows_times(types[i], W[i], row_bytes[i], K, r0, r1, q, d, s, mm,
                       y[i] + (long)m0 * ldy[i], ldy[i]);
        }
    }
    free(q); free(d); free(s);
    return 0;
}

/* ---- a whole decoder layer in one call (decode_mode "quantized", one token) ------------------ */
/* tanh as a rational function (Eigen's float tanh: a few ulp), so the compiler can vectorise it */
static inline float tanh_r(float x) {
    const float lim = 7.90531110763549805f;
    x = x > lim ? lim : (x < -lim ? -lim : x);
    float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    p = p * x;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return p / q;
}

enum { ACT_GELU_TANH = 1, ACT_SILU = 2 };

/* out[i] = act(gate[i]) * up[i] */
void bd_gated(const float *gate, const float *up, int n, int kind, float *out) {
    if (kind == ACT_GELU_TANH) {
        #pragma omp simd
        for (int i = 0; i < n; i++) {
            float g = gate[i];
            out[i] = 0.5f * g * (1.0f + tanh_r(0.7978845608028654f * (g + 0.044715f * g * g * g))) * up[i];
        }
    } else { /* silu: g sigmoid(g), sigmoid(g) = (1 + tanh(g / 2)) / 2 */
        #pragma omp simd
        for (int i = 0; i < n; i++) {
            float g = gate[i];
            out[i] = g * 0.5f * (1.0f + tanh_r(0.5f * g)) * up[i];
        }
    }
}

typedef struct {
    int n[4];                       /* products: 0 q|k|v, 1 o, 2 gate|up, 3 down */
    int types[4][MAXW];
    const uint8_t *W[4][MAXW];
    long row_bytes[4][MAXW];
    int N[4][MAXW];
    int K[4];
    float *out[4];                  /* each product's output row, its weights side by side */
    const float *qkv_bias;          /* NULL: none */
    const float *in_norm, *q_norm, *k_norm, *post_attn_norm, *ff_norm, *post_ff_norm;
    float *attn;                    /* heads x D */
    float *gated;                   /* the MLP's width */
    int heads, kv_heads, D, q_dim, kv_dim, ff, hidden, act;
    float eps, scaling;
} bd_layer;

static int product(const bd_layer *L, int g, const float *x, const float *norm, int threads) {
    float *y[MAXW];
    long ldy[MAXW];
    int total = 0;
    for (int i = 0; i < L->n[g]; i++) total += L->N[g][i];
    for (int i = 0, at = 0; i < L->n[g]; i++) {
        y[i] = L->out[g] + at;
        ldy[i] = total;
        at += L->N[g][i];
    }
    return bd_matmul_n(L->n[g], L->types[g], L->W[g], L->row_bytes[g], L->N[g], L->K[g], x, 1,
                       y, ldy, threads, norm, L->eps);
}

/* one token through layer L: h (hidden floats) is updated in place; the new key and value go to
 * slots at (and at2 >= 0) of keys/values (kv_heads x slots x D), the query attends to [lo, hi).
 * What the fused step's torch path computes, as one call; returns 0, or what a product said. */
int bd_layer_step(const bd_layer *L, float *h, const float *cos, const float *sin, float *keys,
                  float *values, long slots, int at, int at2, int lo, int hi, int threads) {
    int rc;
    if ((rc = product(L, 0, h, L->in_norm, threads))) return rc;
    float *qkv = L->out[0];
    if (L->qkv_bias)
        for (int i = 0; i < L->q_dim + 2 * L->kv_dim; i++) qkv[i] += L->qkv_bias[i];
    bd_norm_rope(qkv, L->heads, L->D, L->q_norm, L->eps, cos, sin);
    bd_norm_rope(qkv + L->q_dim, L->kv_heads, L->D, L->k_norm, L->eps, cos, sin);
    bd_attend(qkv, L->heads, L->kv_heads, L->D, keys, values, slots, qkv + L->q_dim,
              qkv + L->q_dim + L->kv_dim, at, at2, lo, hi, L->scaling, L->attn);
    if ((rc = product(L, 1, L->attn, NULL, threads))) return rc;
    bd_add_norm(h, L->out[1], L->post_attn_norm, L->hidden, L->eps);
    if ((rc = product(L, 2, h, L->ff_norm, threads))) return rc;
    bd_gated(L->out[2], L->out[2] + L->ff, L->ff, L->act, L->gated);
    if ((rc = product(L, 3, L->gated, NULL, threads))) return rc;
    bd_add_norm(h, L->out[3], L->post_ff_norm, L->hidden, L->eps);
    return 0;
}

long bd_layer_size(void) { return (long)sizeof(bd_layer); }

/* one weight: see bd_matmul_n */
int bd_matmul(int type, const uint8_t *W, long row_bytes, int N, int K,
              const float *x, int M, float *y, long ldy, int threads) {
    return bd_matmul_n(1, &type, &W, &row_bytes, &N, K, x, M, &y, &ldy, threads, NULL, 0.0f);
}

int bd_version(void) { return 9; }

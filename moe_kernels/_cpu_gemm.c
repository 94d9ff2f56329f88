/* Grouped GEMMs of an MoE layer on CPU with few rows per expert, on raw pointers (no torch headers).
 *
 * Rows are sorted by expert: rows bounds[e] .. bounds[e + 1] - 1 belong to expert e. With a few rows per
 * expert a product is a stream over the expert's weights (each weight is used by a handful of rows), and the
 * kernels here stream them once per block of 4 rows with the rows held in L1; a BLAS call per expert reaches
 * a fraction of the memory bandwidth at these shapes (bench/cpu_gemm.py). Experts with more than `maxm` rows
 * are skipped (not written): the caller gives them to BLAS.
 *
 *   gemm nt   y[r, n] = sum_k x[r, k] w[e, n, k] (+ bias[e, n])   weights with unit stride along k
 *   gemm nn   y[r, n] = sum_k x[r, k] w[e, k, n] (+ bias[e, n])   weights with unit stride along n
 *   wgrad     out[e, i, j] = sum_{r of e} a[r, i] b[r, j]         out [E, I, J] contiguous; zeros for experts
 *                                                                  without rows
 *
 * Every output element is one fixed sequence of operations whatever the thread count, the schedule, its
 * position in a block or the number of rows (deterministic and batch-invariant): nt sums 8 (fp32) or 4
 * (fp64) lanes over k, then the lanes in a fixed tree, then the k tail; nn and wgrad sum over k in order.
 * Work is split over (expert, block of outputs) tasks with OpenMP, `nthreads` threads (torch's intra-op thread
 * count): the library is linked against the OpenMP runtime already loaded by torch, so its threads are torch's.
 * Offsets are 64-bit.
 */
#include <stdint.h>
#include <string.h>

#define NT_ROWS 32 /* weight rows of one nt task */
#define NN_COLS 32 /* output columns of one nn / wgrad tile: 4 vectors of fp32 (8 of fp64) */
#define WG_ROWS 16 /* output rows of one wgrad task */

#define MIN(a, b) ((a) < (b) ? (a) : (b))

typedef float hv_f32 __attribute__((vector_size(32)));
typedef double hv_f64 __attribute__((vector_size(32)));
static inline float HSUM_f32(hv_f32 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
static inline double HSUM_f64(hv_f64 v) { return (v[0] + v[2]) + (v[1] + v[3]); }

/* streaming (non-temporal) stores of aligned vectors, and the fence that orders them before the caller reads */
#if defined(__AVX__)
#include <immintrin.h>
#define ALIGNED(p) ((((uintptr_t)(p)) & 31) == 0)
static inline void NTSTORE_f32(float* p, hv_f32 v) { _mm256_stream_ps(p, (__m256)v); }
static inline void NTSTORE_f64(double* p, hv_f64 v) { _mm256_stream_pd(p, (__m256d)v); }
static inline void store_fence(void) { _mm_sfence(); }
#else
#define ALIGNED(p) 0
static inline void NTSTORE_f32(float* p, hv_f32 v) { memcpy(p, &v, 32); }
static inline void NTSTORE_f64(double* p, hv_f64 v) { memcpy(p, &v, 32); }
static inline void store_fence(void) {}
#endif

#define DEFINE_KERNELS(T, SUF, LANES)                                                                          \
    typedef T v_##SUF __attribute__((vector_size(32)));                                                        \
    static inline v_##SUF ld_##SUF(const T* p) { v_##SUF v; memcpy(&v, p, 32); return v; }                    \
    static inline void st_##SUF(T* p, v_##SUF v) { memcpy(p, &v, 32); }                                       \
    /* a streaming store (no read of the line first) where aligned: for outputs far larger than the caches */  \
    static inline void stream_##SUF(T* p, v_##SUF v) {                                                         \
        if (ALIGNED(p)) NTSTORE_##SUF(p, v);                                                                   \
        else memcpy(p, &v, 32);                                                                                \
    }                                                                                                          \
    static inline v_##SUF splat_##SUF(T s) { return s - (v_##SUF){0}; } /* s - 0 == s, -0 and NaN included */ \
                                                                                                               \
    static void zero_##SUF(T* p, int64_t n) { /* streaming stores of zeros */                                  \
        const v_##SUF z = {0};                                                                                 \
        int64_t i = 0;                                                                                         \
        for (; i < n && !ALIGNED(p + i); ++i) p[i] = 0;                                                        \
        for (; i + LANES <= n; i += LANES) stream_##SUF(p + i, z);                                             \
        for (; i < n; ++i) p[i] = 0;                                                                           \
    }                                                                                                          \
                                                                                                               \
    /* y[i, j] for i < mb (<= 4, a constant where inlined), j < nb (<= 4): mb rows of x against 4 weight rows */\
    static inline __attribute__((always_inline)) void nt_rows_##SUF(const T* x, int64_t ldx,                  \
            const T* const wr[4], int nb, const T* bias, T* y, int64_t ldy, int mb, int64_t K, int64_t pf) {   \
        const int64_t KV = K - K % LANES;                                                                      \
        v_##SUF a[4][4];                                                                                       \
        memset(a, 0, sizeof(a));                                                                               \
        for (int64_t k = 0; k < KV; k += LANES) {                                                              \
            if (pf)                                                                                            \
                for (int j = 0; j < 4; ++j) __builtin_prefetch(wr[j] + k + pf);                                \
            const v_##SUF w0 = ld_##SUF(wr[0] + k), w1 = ld_##SUF(wr[1] + k);                                  \
            const v_##SUF w2 = ld_##SUF(wr[2] + k), w3 = ld_##SUF(wr[3] + k);                                  \
            for (int i = 0; i < mb; ++i) {                                                                     \
                const v_##SUF xv = ld_##SUF(x + i * ldx + k);                                                  \
                a[i][0] += xv * w0; a[i][1] += xv * w1; a[i][2] += xv * w2; a[i][3] += xv * w3;                \
            }                                                                                                  \
        }                                                                                                      \
        for (int i = 0; i < mb; ++i)                                                                           \
            for (int j = 0; j < nb; ++j) {                                                                     \
                T s = HSUM_##SUF(a[i][j]);                                                                     \
                for (int64_t k = KV; k < K; ++k) s += x[i * ldx + k] * wr[j][k];                               \
                y[i * ldy + j] = bias ? s + bias[j] : s;                                                       \
            }                                                                                                  \
    }                                                                                                          \
                                                                                                               \
    /* y[m, j] for m < M, j < nb (<= 4): 4 rows of x at a time against 4 weight rows (prefetching the next     \
       4 weight rows while the first rows of x run); the last 1-3 rows without the redundant ones */           \
    static void nt_tile_##SUF(const T* x, int64_t ldx, const T* const wr[4], int nb, const T* bias, T* y,      \
                              int64_t ldy, int64_t M, int64_t K, int64_t pf) {                                 \
        for (int64_t m = 0; m < M; m += 4) {                                                                   \
            const int64_t p = m == 0 ? pf : 0;                                                                 \
            const T* xm = x + m * ldx;                                                                         \
            T* ym = y + m * ldy;                                                                               \
            switch (MIN(M - m, 4)) {                                                                           \
                case 1: nt_rows_##SUF(xm, ldx, wr, nb, bias, ym, ldy, 1, K, p); break;                         \
                case 2: nt_rows_##SUF(xm, ldx, wr, nb, bias, ym, ldy, 2, K, p); break;                         \
                case 3: nt_rows_##SUF(xm, ldx, wr, nb, bias, ym, ldy, 3, K, p); break;                         \
                default: nt_rows_##SUF(xm, ldx, wr, nb, bias, ym, ldy, 4, K, p);                               \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
                                                                                                               \
    /* y[i, j] = sum_k x[i * sxm + k * sxk] w[k * swk + j] (+ bias[j]) for i < ms, j < nv * LANES: mb rows      \
       computed (mb <= 4, a constant where inlined; rows past ms repeat row 0), ms <= mb stored */            \
    static inline __attribute__((always_inline)) void nn_mrows_##SUF(const T* x, int64_t sxm, int64_t sxk,     \
            const T* w, int64_t swk, const T* bias, T* y, int64_t ldy, int mb, int ms, int nv, int64_t K,      \
            int streaming) {                                                                                   \
        const T* xr[4];                                                                                        \
        for (int i = 0; i < 4; ++i) xr[i] = x + (i < ms ? i : 0) * sxm;                                        \
        v_##SUF a[4][NN_COLS / LANES];                                                                         \
        memset(a, 0, sizeof(a));                                                                               \
        for (int64_t k = 0; k < K; ++k) {                                                                      \
            const T* wk = w + k * swk;                                                                         \
            __builtin_prefetch(wk + 4 * swk);                                                                  \
            for (int i = 0; i < mb; ++i) {                                                                     \
                const v_##SUF xs = splat_##SUF(xr[i][k * sxk]);                                                \
                for (int v = 0; v < nv; ++v) a[i][v] += xs * ld_##SUF(wk + v * LANES);                         \
            }                                                                                                  \
        }                                                                                                      \
        for (int i = 0; i < ms; ++i)                                                                           \
            for (int v = 0; v < nv; ++v) {                                                                     \
                v_##SUF o = a[i][v];                                                                           \
                if (bias) o += ld_##SUF(bias + v * LANES);                                                     \
                if (streaming) stream_##SUF(y + i * ldy + v * LANES, o);                                       \
                else st_##SUF(y + i * ldy + v * LANES, o);                                                     \
            }                                                                                                  \
    }                                                                                                          \
                                                                                                               \
    /* y[m, j] = sum_k x[m * sxm + k * sxk] w[k * swk + j] (+ bias[j]) for m < M, j < nv * LANES + rem */      \
    static inline __attribute__((always_inline)) void nn_rows_##SUF(const T* x, int64_t sxm, int64_t sxk,      \
            const T* w, int64_t swk, const T* bias, T* y, int64_t ldy, int64_t M, int nv, int rem, int64_t K,   \
            int streaming) {                                                                                   \
        for (int64_t m = 0; m < M; m += 4) {                                                                   \
            const T* xm = x + m * sxm;                                                                         \
            T* ym = y + m * ldy;                                                                               \
            const int ms = (int)MIN(M - m, 4);                                                                 \
            if (streaming || ms == 4) /* the weight gradient: many rows, 4 at a time */                        \
                nn_mrows_##SUF(xm, sxm, sxk, w, swk, bias, ym, ldy, 4, ms, nv, K, streaming);                  \
            else if (ms == 1) /* a few rows (decode): no redundant ones */                                     \
                nn_mrows_##SUF(xm, sxm, sxk, w, swk, bias, ym, ldy, 1, 1, nv, K, 0);                           \
            else if (ms == 2)                                                                                  \
                nn_mrows_##SUF(xm, sxm, sxk, w, swk, bias, ym, ldy, 2, 2, nv, K, 0);                           \
            else                                                                                               \
                nn_mrows_##SUF(xm, sxm, sxk, w, swk, bias, ym, ldy, 3, 3, nv, K, 0);                           \
        }                                                                                                      \
        for (int64_t m = 0; m < M; ++m) /* the last rem (< LANES) columns: the same sums, one at a time */     \
            for (int j = nv * LANES; j < nv * LANES + rem; ++j) {                                              \
                T s = 0;                                                                                       \
                for (int64_t k = 0; k < K; ++k) s += x[m * sxm + k * sxk] * w[k * swk + j];                    \
                y[m * ldy + j] = bias ? s + bias[j] : s;                                                       \
            }                                                                                                  \
    }                                                                                                          \
                                                                                                               \
    static void nn_tile_##SUF(const T* x, int64_t sxm, int64_t sxk, const T* w, int64_t swk, const T* bias,   \
                              T* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int streaming) {             \
        if (N == NN_COLS && streaming) /* full tiles: the vector count a constant */                           \
            nn_rows_##SUF(x, sxm, sxk, w, swk, bias, y, ldy, M, NN_COLS / LANES, 0, K, 1);                     \
        else if (N == NN_COLS)                                                                                 \
            nn_rows_##SUF(x, sxm, sxk, w, swk, bias, y, ldy, M, NN_COLS / LANES, 0, K, 0);                     \
        else                                                                                                   \
            nn_rows_##SUF(x, sxm, sxk, w, swk, bias, y, ldy, M, (int)(N / LANES), (int)(N % LANES), K, 0);     \
    }                                                                                                          \
                                                                                                               \
    /* nt: w[e, n, k] at w + e * swe + n * sw + k; nn: w[e, k, n] at w + e * swe + k * sw + n */              \
    void moe_gemm_##SUF(int nt, const T* x, int64_t ldx, const T* w, int64_t swe, int64_t sw, const T* bias,  \
                        int64_t sbe, T* y, int64_t ldy, const int64_t* bounds, int64_t E, int64_t N, int64_t K, \
                        int64_t maxm, int nthreads) {                                                          \
        const int64_t cols = nt ? NT_ROWS : NN_COLS, nb = (N + cols - 1) / cols;                               \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                                 \
        for (int64_t t = 0; t < E * nb; ++t) {                                                                 \
            const int64_t e = t / nb, n0 = (t % nb) * cols, n1 = MIN(n0 + cols, N);                            \
            const int64_t lo = bounds[e], hi = bounds[e + 1];                                                  \
            const T* be = bias ? bias + e * sbe : 0;                                                           \
            if (hi <= lo || hi - lo > maxm) continue;                                                          \
            if (!nt) {                                                                                         \
                nn_tile_##SUF(x + lo * ldx, ldx, 1, w + e * swe + n0, sw, be ? be + n0 : 0, y + lo * ldy + n0, \
                              ldy, hi - lo, n1 - n0, K, 0);                                                    \
                continue;                                                                                      \
            }                                                                                                  \
            for (int64_t n = n0; n < n1; n += 4) {                                                             \
                const int cnt = (int)MIN(n1 - n, 4);                                                           \
                const T* wr[4];                                                                                \
                for (int j = 0; j < 4; ++j) wr[j] = w + e * swe + (n + (j < cnt ? j : 0)) * sw;                \
                nt_tile_##SUF(x + lo * ldx, ldx, wr, cnt, be ? be + n : 0, y + lo * ldy + n, ldy, hi - lo, K,  \
                              4 * sw);                                                                         \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
                                                                                                               \
    void moe_wgrad_##SUF(const T* a, int64_t lda, const T* b, int64_t ldb, T* out, const int64_t* bounds,     \
                         int64_t E, int64_t I, int64_t J, int64_t maxm, int nthreads) {                        \
        const int64_t ib = (I + WG_ROWS - 1) / WG_ROWS;                                                        \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                                 \
        for (int64_t t = 0; t < E * ib; ++t) {                                                                 \
            const int64_t e = t / ib, i0 = (t % ib) * WG_ROWS, i1 = MIN(i0 + WG_ROWS, I);                      \
            const int64_t lo = bounds[e], hi = bounds[e + 1];                                                  \
            T* o = out + (e * I + i0) * J;                                                                     \
            if (hi - lo > maxm) continue;                                                                      \
            if (hi <= lo) {                                                                                    \
                zero_##SUF(o, (i1 - i0) * J);                                                                  \
                store_fence();                                                                                 \
                continue;                                                                                      \
            }                                                                                                  \
            for (int64_t j0 = 0; j0 < J; j0 += NN_COLS)                                                        \
                nn_tile_##SUF(a + lo * lda + i0, 1, lda, b + lo * ldb + j0, ldb, 0, o + j0, J, i1 - i0,        \
                              MIN(NN_COLS, J - j0), hi - lo, 1);                                               \
            store_fence();                                                                                     \
        }                                                                                                      \
    }

DEFINE_KERNELS(float, f32, 8)
DEFINE_KERNELS(double, f64, 4)

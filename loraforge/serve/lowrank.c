/* The low-rank path of one step for one group of projections that read the same input (q, k, v;
 * gate, up; or one projection alone), every token with its own adapter, in place:
 *
 *     y_i[t] += (x[t] A_a(t)ᵀ)[rank rows of module i] (s B_i,a(t))ᵀ      then, for DoRA slots,
 *     y_i[t]  = g_i,a(t) ⊙ (y_i[t] - bias_i) + bias_i
 *
 * Tokens come sorted by slot (one segment per slot). Each segment reads its slot's A and Bᵀ rows straight
 * from the pool's buffers (loraforge/serve/pool.py: A (slots, R G, d_in) rank-major, row k G + i is rank k
 * of module i; Bᵀ_i (slots, R, d_out_i)), once per TOKENS tokens, and keeps their x Aᵀ in a small local
 * buffer: no scatter into a padded layout, no permute, no gather. A decode step is bound by streaming the
 * factors of every adapter in the batch (32 adapters of ranks 8 and 16 on SmolLM2-135M: 469 MB, the base's
 * weights 540 MB); the torch path spent a third of its time around its batched matmuls. In prefill the
 * blocked products below also beat a pair of small matmuls per segment. The pool alone on the 2-core Xeon, 32 adapters of ranks 8
 * and 16 over SmolLM2's 30 layers: a decode step of 64 tokens in 27-29 ms (padded layout: 51-58 ms),
 * a prefill of 5,120 tokens in 0.41-0.42 s (a matmul pair per segment: 0.61-0.65 s).
 * Segments are split between the threads; each writes only its own tokens' rows.
 *
 * Floats only (the pool's dtype on CPU). Sums run in another order than torch's matmuls: the result
 * equals them to rounding, not to the bit.
 */
#include <stdint.h>

#define TOKENS 4 /* tokens of a segment that share one read of its factors (longer segments re-read them from cache) */
#define ROWS 4   /* factor rows per pass: ROWS x tokens independent sums in flight, and one load of y per ROWS rows */
#define LANES 16 /* one 512-bit vector of partial sums per (row, token) */

/* out[row * 1 + t * stride] = a_row · x_t for m <= ROWS rows a_row = a + row d and N tokens x_t = x + t d,
 * each kept in LANES partial sums across the rows' single pass. */
static inline void dots(int N, int m, const float *restrict a, const float *restrict x, int64_t d, float *out,
                        int64_t stride) {
    float acc[ROWS][TOKENS][LANES] = {{{0}}};
    int64_t j = 0;
    for (; j + LANES <= d; j += LANES)
        for (int row = 0; row < m; row++)
            for (int t = 0; t < N; t++)
#pragma omp simd
                for (int l = 0; l < LANES; l++) acc[row][t][l] += a[row * d + j + l] * x[t * d + j + l];
    for (int row = 0; row < m; row++)
        for (int t = 0; t < N; t++) {
            float *v = acc[row][t];
            float sum = 0.0f;
            for (int l = 0; l < LANES; l++) sum += v[l];
            for (int64_t k = j; k < d; k++) sum += a[row * d + k] * x[t * d + k];
            out[row + t * stride] = sum;
        }
}

/* y_t += Σ_row c[row * step + t * stride] b_row for m <= ROWS rows b_row = b + row d and N token rows
 * y_t = y + t d: each vector of the ROWS rows of b is loaded once for all N tokens, and y once per ROWS rows. */
static inline void axpys(int N, int m, float *restrict y, const float *restrict c, int64_t step, int64_t stride,
                         const float *restrict b, int64_t d) {
    float ct[TOKENS][ROWS];
    const float *bs[ROWS];
    for (int row = 0; row < ROWS; row++) {
        bs[row] = b + (row < m ? row : 0) * d;  /* a missing row adds 0 times row 0 */
        for (int t = 0; t < N; t++) ct[t][row] = row < m ? c[row * step + t * stride] : 0.0f;
    }
    int64_t j = 0;
    for (; j + LANES <= d; j += LANES)
        for (int t = 0; t < N; t++)
#pragma omp simd
            for (int l = 0; l < LANES; l++)
                y[t * d + j + l] += ct[t][0] * bs[0][j + l] + ct[t][1] * bs[1][j + l] + ct[t][2] * bs[2][j + l] +
                                    ct[t][3] * bs[3][j + l];
    for (; j < d; j++)
        for (int t = 0; t < N; t++)
            y[t * d + j] += ct[t][0] * bs[0][j] + ct[t][1] * bs[1][j] + ct[t][2] * bs[2][j] + ct[t][3] * bs[3][j];
}

/* segments: (slot, start, end) x n_segments. ranks: (G, slots) each module's rank in each slot.
 * gains: G pointers to each module's first gain column, slot rows gain_stride floats apart (one buffer per group);
 * gained: (G, slots) 1 where that slot's module is DoRA's; biases: G pointers or NULL; threads: torch's count. */
void lowrank_group(int64_t n_segments, const int64_t *segments, const float *x, int64_t d_in,
                   const float *A, int64_t max_rank, int64_t G, int64_t slots, const float *const *Bt,
                   float *const *ys, const int64_t *d_out, const int64_t *ranks, const float *const *gains,
                   int64_t gain_stride, const uint8_t *gained, const float *const *biases, int threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t s = 0; s < n_segments; s++) {
        const int64_t slot = segments[3 * s], start = segments[3 * s + 1], end = segments[3 * s + 2];
        int64_t r = 0;
        for (int64_t i = 0; i < G; i++)
            if (ranks[i * slots + slot] > r) r = ranks[i * slots + slot];
        float xa[TOKENS * r * G + 1]; /* (tokens, r G): x Aᵀ of up to TOKENS tokens */
        for (int64_t t0 = start; t0 < end; t0 += TOKENS) {
            const int64_t n = end - t0 < TOKENS ? end - t0 : TOKENS;
            if (r) {
                const float *a = A + slot * max_rank * G * d_in;
                for (int64_t row = 0; row < r * G; row += ROWS) {  /* ROWS rows of A against every token */
                    const int m = r * G - row < ROWS ? (int)(r * G - row) : ROWS;
#define DOTS(N) (m == ROWS ? dots(N, ROWS, a + row * d_in, x + t0 * d_in, d_in, xa + row, r * G) \
                          : dots(N, m, a + row * d_in, x + t0 * d_in, d_in, xa + row, r * G))
                    switch (n) {  /* constant counts let the compiler keep every partial sum in registers */
                        case 1: DOTS(1); break;
                        case 2: DOTS(2); break;
                        case 3: DOTS(3); break;
                        default: DOTS(4);
                    }
                }
            }
            for (int64_t i = 0; i < G; i++) {
                const int64_t rank = ranks[i * slots + slot], width = d_out[i];
                float *y = ys[i] + t0 * width;
                for (int64_t k = 0; k < rank; k += ROWS) {  /* ROWS rows of Bᵀ added into every token's output */
                    const int m = rank - k < ROWS ? (int)(rank - k) : ROWS;
#define AXPYS(N) axpys(N, m, y, xa + k * G + i, G, r * G, Bt[i] + (slot * max_rank + k) * width, width)
                    switch (n) {
                        case 1: AXPYS(1); break;
                        case 2: AXPYS(2); break;
                        case 3: AXPYS(3); break;
                        default: AXPYS(4);
                    }
                }
                if (gained[i * slots + slot]) {
                    const float *g = gains[i] + slot * gain_stride, *bias = biases[i];
                    for (int64_t t = 0; t < n; t++) {
                        float *row = y + t * width;
#pragma omp simd
                        for (int64_t j = 0; j < width; j++)
                            row[j] = bias ? (row[j] - bias[j]) * g[j] + bias[j] : row[j] * g[j];
                    }
                }
            }
        }
    }
}

// Multi-head attention forward and backward without the [Nq, Nk] score matrix, in the way of
// FlashAttention: keys and values stream through shared memory in tiles of ATT_KEYS, each
// thread owns one query (or, in the key/value gradient pass, one key) and keeps its running
// softmax state in registers. The backward pass recomputes probabilities from the per-query
// log-sum-exp.
//
// Layout as the projections produce it: q [B, Nq, H*D], k and v [B, Nk, H*D]; head h is the
// slice h*D..(h+1)*D of the last dimension. Grid: (ceil(rows / ATT_ROWS), B*H), block ATT_ROWS.
#define ATT_ROWS 64
#define ATT_KEYS 32

// Rows start..start+n of head h of batch b, as f32, times `scale`, into a [ATT_KEYS][D] tile.
template <typename T, int D>
__device__ __forceinline__ void load_tile(const T* x, float (*tile)[D], int b, int start, int n, int rows, long width,
                                          int h, float scale) {
    for (int idx = threadIdx.x; idx < ATT_KEYS * D; idx += blockDim.x) {
        int r = idx / D, c = idx % D;
        tile[r][c] = r < n ? to_f32(x[((long)b * rows + start + r) * width + (long)h * D + c]) * scale : 0.0f;
    }
}

template <typename T, int D>
__device__ __forceinline__ void load_row(const T* x, long at, float scale, float* out) {
#pragma unroll
    for (int c = 0; c < D; c++) out[c] = to_f32(x[at + c]) * scale;
}

// o = softmax(q k^T * scale) v.
template <typename T, int D>
__device__ void attention_forward(const T* q, const T* k, const T* v, T* o, int nq, int nk, int heads, float scale) {
    __shared__ float ks[ATT_KEYS][D];
    __shared__ float vs[ATT_KEYS][D];
    int b = blockIdx.y / heads, h = blockIdx.y % heads;
    int i = blockIdx.x * ATT_ROWS + threadIdx.x;
    bool active = i < nq;
    long width = (long)heads * D;
    long row = ((long)b * nq + (active ? i : 0)) * width + (long)h * D;
    float qr[D], acc[D];
    load_row<T, D>(q, row, scale, qr);
#pragma unroll
    for (int c = 0; c < D; c++) acc[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (int start = 0; start < nk; start += ATT_KEYS) {
        int n = min(ATT_KEYS, nk - start);
        load_tile<T, D>(k, ks, b, start, n, nk, width, h, 1.0f);
        load_tile<T, D>(v, vs, b, start, n, nk, width, h, 1.0f);
        __syncthreads();
        // Scores of the tile first (kept in a small per-thread array), then one rescale of
        // the accumulator per tile instead of one per key. The key loops are not unrolled:
        // unrolling both loops made NVRTC take minutes per head size.
        float s[ATT_KEYS];
        float top = m;
#pragma unroll 1
        for (int j = 0; j < n; j++) {
            float d = 0.0f;
#pragma unroll
            for (int c = 0; c < D; c++) d += qr[c] * ks[j][c];
            s[j] = d;
            top = fmaxf(top, d);
        }
        float correction = expf(m - top);
        l *= correction;
#pragma unroll
        for (int c = 0; c < D; c++) acc[c] *= correction;
#pragma unroll 1
        for (int j = 0; j < n; j++) {
            float p = expf(s[j] - top);
            l += p;
#pragma unroll
            for (int c = 0; c < D; c++) acc[c] += p * vs[j][c];
        }
        m = top;
        __syncthreads();
    }
    if (active) {
        float inv = 1.0f / l;
#pragma unroll
        for (int c = 0; c < D; c++) put(o, row + c, acc[c] * inv);
    }
}

// Per query: the log-sum-exp of its scaled scores and delta = dO . O (rowsum(dO * O)).
template <typename T, int D>
__device__ void attention_backward_stats(const T* q, const T* k, const T* o, const T* go, float* lse, float* delta,
                                         int nq, int nk, int heads, float scale) {
    __shared__ float ks[ATT_KEYS][D];
    int b = blockIdx.y / heads, h = blockIdx.y % heads;
    int i = blockIdx.x * ATT_ROWS + threadIdx.x;
    bool active = i < nq;
    long width = (long)heads * D;
    long row = ((long)b * nq + (active ? i : 0)) * width + (long)h * D;
    float qr[D];
    load_row<T, D>(q, row, scale, qr);
    float m = NEG_INF, l = 0.0f;
    for (int start = 0; start < nk; start += ATT_KEYS) {
        int n = min(ATT_KEYS, nk - start);
        load_tile<T, D>(k, ks, b, start, n, nk, width, h, 1.0f);
        __syncthreads();
        for (int j = 0; j < n; j++) {
            float d = 0.0f;
#pragma unroll
            for (int c = 0; c < D; c++) d += qr[c] * ks[j][c];
            float top = fmaxf(m, d);
            l = l * expf(m - top) + expf(d - top);
            m = top;
        }
        __syncthreads();
    }
    if (active) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < D; c++) dot += to_f32(go[row + c]) * to_f32(o[row + c]);
        long at = (long)blockIdx.y * nq + i;
        lse[at] = m + logf(l);
        delta[at] = dot;
    }
}

// dq_i = scale * sum_j p_ij (dO_i . v_j - delta_i) k_j.
template <typename T, int D>
__device__ void attention_backward_query(const T* q, const T* k, const T* v, const T* go, const float* lse,
                                         const float* delta, T* dq, int nq, int nk, int heads, float scale) {
    __shared__ float ks[ATT_KEYS][D];
    __shared__ float vs[ATT_KEYS][D];
    int b = blockIdx.y / heads, h = blockIdx.y % heads;
    int i = blockIdx.x * ATT_ROWS + threadIdx.x;
    bool active = i < nq;
    long width = (long)heads * D;
    long row = ((long)b * nq + (active ? i : 0)) * width + (long)h * D;
    long at = (long)blockIdx.y * nq + (active ? i : 0);
    float qr[D], gr[D], acc[D];
    load_row<T, D>(q, row, scale, qr);
    load_row<T, D>(go, row, 1.0f, gr);
#pragma unroll
    for (int c = 0; c < D; c++) acc[c] = 0.0f;
    float li = lse[at], di = delta[at];
    for (int start = 0; start < nk; start += ATT_KEYS) {
        int n = min(ATT_KEYS, nk - start);
        load_tile<T, D>(k, ks, b, start, n, nk, width, h, 1.0f);
        load_tile<T, D>(v, vs, b, start, n, nk, width, h, 1.0f);
        __syncthreads();
        for (int j = 0; j < n; j++) {
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int c = 0; c < D; c++) {
                s += qr[c] * ks[j][c];
                dp += gr[c] * vs[j][c];
            }
            float ds = expf(s - li) * (dp - di);
#pragma unroll
            for (int c = 0; c < D; c++) acc[c] += ds * ks[j][c];
        }
        __syncthreads();
    }
    if (active) {
#pragma unroll
        for (int c = 0; c < D; c++) put(dq, row + c, acc[c] * scale);
    }
}

// Per key j: dv_j = sum_i p_ij dO_i, dk_j = scale * sum_i p_ij (dO_i . v_j - delta_i) q_i.
template <typename T, int D>
__device__ void attention_backward_key(const T* q, const T* k, const T* v, const T* go, const float* lse,
                                       const float* delta, T* dk, T* dv, int nq, int nk, int heads, float scale) {
    __shared__ float qs[ATT_KEYS][D];
    __shared__ float gs[ATT_KEYS][D];
    __shared__ float ls[ATT_KEYS], ds_[ATT_KEYS];
    int b = blockIdx.y / heads, h = blockIdx.y % heads;
    int j = blockIdx.x * ATT_ROWS + threadIdx.x;
    bool active = j < nk;
    long width = (long)heads * D;
    long row = ((long)b * nk + (active ? j : 0)) * width + (long)h * D;
    float kr[D], vr[D], dkr[D], dvr[D];
    load_row<T, D>(k, row, 1.0f, kr);
    load_row<T, D>(v, row, 1.0f, vr);
#pragma unroll
    for (int c = 0; c < D; c++) {
        dkr[c] = 0.0f;
        dvr[c] = 0.0f;
    }
    for (int start = 0; start < nq; start += ATT_KEYS) {
        int n = min(ATT_KEYS, nq - start);
        load_tile<T, D>(q, qs, b, start, n, nq, width, h, scale);
        load_tile<T, D>(go, gs, b, start, n, nq, width, h, 1.0f);
        for (int r = threadIdx.x; r < ATT_KEYS; r += blockDim.x) {
            long at = (long)blockIdx.y * nq + start + r;
            ls[r] = r < n ? lse[at] : 0.0f;
            ds_[r] = r < n ? delta[at] : 0.0f;
        }
        __syncthreads();
        for (int i = 0; i < n; i++) {
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int c = 0; c < D; c++) {
                s += qs[i][c] * kr[c];
                dp += gs[i][c] * vr[c];
            }
            float p = expf(s - ls[i]);
            float ds = p * (dp - ds_[i]);
#pragma unroll
            for (int c = 0; c < D; c++) {
                dvr[c] += p * gs[i][c];
                dkr[c] += ds * qs[i][c];
            }
        }
        __syncthreads();
    }
    if (active) {
#pragma unroll
        for (int c = 0; c < D; c++) {
            put(dk, row + c, dkr[c]);
            put(dv, row + c, dvr[c]);
        }
    }
}

// extern "C" entry points per element type and head size: attention_<pass>_<type>_d<D>.
#define ATTENTION_KERNELS(T, NAME, D)                                                                                  \
    extern "C" __global__ void attention_forward_##NAME##_d##D(const T* q, const T* k, const T* v, T* o, int nq,       \
                                                               int nk, int heads, float scale) {                       \
        attention_forward<T, D>(q, k, v, o, nq, nk, heads, scale);                                                     \
    }                                                                                                                  \
    extern "C" __global__ void attention_backward_stats_##NAME##_d##D(const T* q, const T* k, const T* o, const T* go, \
                                                                      float* lse, float* delta, int nq, int nk,         \
                                                                      int heads, float scale) {                        \
        attention_backward_stats<T, D>(q, k, o, go, lse, delta, nq, nk, heads, scale);                                 \
    }                                                                                                                  \
    extern "C" __global__ void attention_backward_query_##NAME##_d##D(const T* q, const T* k, const T* v, const T* go, \
                                                                      const float* lse, const float* delta, T* dq,     \
                                                                      int nq, int nk, int heads, float scale) {        \
        attention_backward_query<T, D>(q, k, v, go, lse, delta, dq, nq, nk, heads, scale);                             \
    }                                                                                                                  \
    extern "C" __global__ void attention_backward_key_##NAME##_d##D(const T* q, const T* k, const T* v, const T* go,   \
                                                                    const float* lse, const float* delta, T* dk,       \
                                                                    T* dv, int nq, int nk, int heads, float scale) {   \
        attention_backward_key<T, D>(q, k, v, go, lse, delta, dk, dv, nq, nk, heads, scale);                           \
    }

// ---- Tensor-core attention: bf16 inputs, f32 accumulation, head sizes that are multiples of 16
// up to 128 (FlashAttention-2's scheme on mma.sync.m16n8k16). Each warp owns 16 rows (queries in
// the forward and dq passes, keys in the dk/dv pass) and walks the other operand in shared-memory
// tiles of TC_TILE rows, 16 at a time. Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4,
// t = lane % 4): A (16x16, row-major) registers hold (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
// (g+8, 2t+8..); B (16x8) registers hold (k = 2t..2t+1, n = g) and (k = 2t+8.., n = g); C (16x8,
// f32) holds (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1). So the C tiles of a 16x16 score block
// are, packed to bf16, the A fragment of the next product, and each accumulator's row is known
// (the online softmax rescales registers in place).
#define TC_WARPS 4
#define TC_ROWS (16 * TC_WARPS)
#define TC_TILE 64
#define TC_MASKED (-1.0e30f)

// c += a b on the tensor cores. (tests/emulate/ compiles these kernels for the host with its own
// tc_mma, a warp-wide emulation of the same fragment layouts, to test them without a GPU.)
#ifndef LATENTFLOW_EMULATED_MMA
__device__ __forceinline__ void tc_mma(float* c, const unsigned* a, const unsigned* b) {
#if __CUDA_ARCH__ < 800
    __trap();  // bf16 mma needs sm_80; the launchers use these kernels only there
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif

__device__ __forceinline__ unsigned tc_pack(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}

// Two bf16 of a shared-memory tile as one register: (row, col) and (row, col + 1) ...
__device__ __forceinline__ unsigned tc_pair(const bf16_t* s, int stride, int row, int col) {
    return *(const unsigned*)&s[row * stride + col];
}

// ... or (row, col) and (row + 1, col).
__device__ __forceinline__ unsigned tc_column_pair(const bf16_t* s, int stride, int row, int col) {
    return (unsigned)s[row * stride + col] | ((unsigned)s[(row + 1) * stride + col] << 16);
}

// The A fragment of rows r0..r0+15, columns c0..c0+15 of a row-major tile.
__device__ __forceinline__ void tc_a(const bf16_t* s, int stride, int r0, int c0, unsigned* a) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    a[0] = tc_pair(s, stride, r0 + g, c0 + 2 * t);
    a[1] = tc_pair(s, stride, r0 + g + 8, c0 + 2 * t);
    a[2] = tc_pair(s, stride, r0 + g, c0 + 2 * t + 8);
    a[3] = tc_pair(s, stride, r0 + g + 8, c0 + 2 * t + 8);
}

// The B fragment B(k, n) = M[n0 + n][k0 + k] (the tile transposed: K^T, V^T, Q^T, dO^T).
__device__ __forceinline__ void tc_b_transposed(const bf16_t* s, int stride, int n0, int k0, unsigned* b) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    b[0] = tc_pair(s, stride, n0 + g, k0 + 2 * t);
    b[1] = tc_pair(s, stride, n0 + g, k0 + 2 * t + 8);
}

// The B fragment B(k, n) = M[k0 + k][n0 + n] (the tile as it is: V, dO, K, Q).
__device__ __forceinline__ void tc_b(const bf16_t* s, int stride, int k0, int n0, unsigned* b) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    b[0] = tc_column_pair(s, stride, k0 + 2 * t, n0 + g);
    b[1] = tc_column_pair(s, stride, k0 + 2 * t + 8, n0 + g);
}

// Rows start..start+n of head h of batch b (of `rows` rows) into a [TC_TILE][D + 8] tile, zeros
// past n. The 8 columns of padding shift each row by four banks, so the fragment loads of a
// warp's eight row groups do not collide.
template <int D>
__device__ __forceinline__ void tc_load(const bf16_t* x, bf16_t* s, int b, int start, int n, int rows, long width,
                                        int h) {
    for (int idx = threadIdx.x; idx < TC_TILE * D; idx += blockDim.x) {
        int r = idx / D, c = idx % D;
        s[r * (D + 8) + c] = r < n ? x[((long)b * rows + start + r) * width + (long)h * D + c] : (bf16_t)0;
    }
}

// Sum over the four threads of a row group (t = 0..3).
__device__ __forceinline__ float tc_row_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

__device__ __forceinline__ float tc_row_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Stores a warp's accumulators (rows r0 and r0 + 8 of head h of batch b, `rows` rows in all)
// times scale0 and scale1, skipping rows past the end.
template <int D>
__device__ __forceinline__ void tc_store(bf16_t* out, const float (*acc)[4], int b, int r0, int rows, long width,
                                         int h, float scale0, float scale1) {
    int t = threadIdx.x % 4;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
        long col = (long)h * D + dt * 8 + 2 * t;
        if (r0 < rows) {
            put(out, ((long)b * rows + r0) * width + col, acc[dt][0] * scale0);
            put(out, ((long)b * rows + r0) * width + col + 1, acc[dt][1] * scale0);
        }
        if (r0 + 8 < rows) {
            put(out, ((long)b * rows + r0 + 8) * width + col, acc[dt][2] * scale1);
            put(out, ((long)b * rows + r0 + 8) * width + col + 1, acc[dt][3] * scale1);
        }
    }
}

// Scores of this warp's 16 query rows (A fragments `qa`, the first of them query `query0`)
// against keys j0..j0+15 of the tile `ks` (whose first key is key0): two C tiles, scaled; keys at
// or past nk, and with `causal` keys after their query, masked.
template <int D>
__device__ __forceinline__ void tc_scores(const unsigned (*qa)[4], const bf16_t* ks, int j0, int key0, int nk,
                                          int query0, int causal, float scale, float (*s)[4]) {
    int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned b[2];
            tc_b_transposed(ks, D + 8, j0 + nt * 8, kk * 16, b);
            tc_mma(s[nt], qa[kk], b);
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int key = key0 + j0 + nt * 8 + 2 * t + (e & 1), query = query0 + g + (e >= 2 ? 8 : 0);
            s[nt][e] = key < nk && !(causal && key > query) ? s[nt][e] * scale : TC_MASKED;
        }
    }
}

// o = softmax(q k^T * scale) v, online over key tiles. Grid (ceil(nq / 64), B*H), 128 threads.
template <int D>
__device__ void tc_attention_forward(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int nq, int nk,
                                     int heads, int causal, float scale) {
    __shared__ __align__(16) bf16_t ks[TC_TILE * (D + 8)];
    __shared__ __align__(16) bf16_t vs[TC_TILE * (D + 8)];
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
    int b = blockIdx.y / heads, h = blockIdx.y % heads;
    long width = (long)heads * D;
    int q0 = blockIdx.x * TC_ROWS;
    tc_load<D>(q, ks, b, q0, min(TC_ROWS, nq - q0), nq, width, h);
    __syncthreads();
    unsigned qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) tc_a(ks, D + 8, warp * 16, kk * 16, qa[kk]);
    __syncthreads();
    float acc[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.0f;
    float m0 = TC_MASKED, m1 = TC_MASKED, l0 = 0.0f, l1 = 0.0f;  // rows g and g + 8
    for (int start = 0; start < nk; start += TC_TILE) {
        int n = min(TC_TILE, nk - start);
        tc_load<D>(k, ks, b, start, n, nk, width, h);
        tc_load<D>(v, vs, b, start, n, nk, width, h);
        __syncthreads();
        for (int j0 = 0; j0 < n; j0 += 16) {
            float s[2][4];
            tc_scores<D>(qa, ks, j0, start, nk, q0 + warp * 16, causal, scale, s);
            float top0 = tc_row_max(fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1])));
            float top1 = tc_row_max(fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3])));
            float new0 = fmaxf(m0, top0), new1 = fmaxf(m1, top1);
            float c0 = __expf(m0 - new0), c1 = __expf(m1 - new1);
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                s[nt][0] = __expf(s[nt][0] - new0);
                s[nt][1] = __expf(s[nt][1] - new0);
                s[nt][2] = __expf(s[nt][2] - new1);
                s[nt][3] = __expf(s[nt][3] - new1);
            }
            // Each thread keeps its share of the row sums; the shares are added at the end.
            l0 = l0 * c0 + s[0][0] + s[0][1] + s[1][0] + s[1][1];
            l1 = l1 * c1 + s[0][2] + s[0][3] + s[1][2] + s[1][3];
            m0 = new0;
            m1 = new1;
            unsigned pa[4] = {tc_pack(s[0][0], s[0][1]), tc_pack(s[0][2], s[0][3]), tc_pack(s[1][0], s[1][1]),
                              tc_pack(s[1][2], s[1][3])};
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                acc[dt][0] *= c0;
                acc[dt][1] *= c0;
                acc[dt][2] *= c1;
                acc[dt][3] *= c1;
                unsigned bv[2];
                tc_b(vs, D + 8, j0, dt * 8, bv);
                tc_mma(acc[dt], pa, bv);
            }
        }
        __syncthreads();
    }
    l0 = tc_row_sum(l0);
    l1 = tc_row_sum(l1);
    tc_store<D>(o, acc, b, q0 + warp * 16 + g, nq, width, h, 1.0f / l0, 1.0f / l1);
}

// Per query: the log-sum-exp of its scaled scores (the tensor-core score pass without values)
// and delta = dO . O. Grid (ceil(nq / 64), B*H), 128 threads.
template <int D>
__device__ void tc_attention_backward_stats(const bf16_t* q, const bf16_t* k, const bf16_t* o, const bf16_t* go,
                                            float* lse, float* delta, int nq, int nk, int heads, int causal,
                                            float scale) {
    __shared__ __align__(16) bf16_t ks[TC_TILE * (D + 8)];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int b = blockIdx.y / heads, h = blockIdx.y % heads;
    long width = (long)heads * D;
    int q0 = blockIdx.x * TC_ROWS;
    tc_load<D>(q, ks, b, q0, min(TC_ROWS, nq - q0), nq, width, h);
    __syncthreads();
    unsigned qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) tc_a(ks, D + 8, warp * 16, kk * 16, qa[kk]);
    __syncthreads();
    float m0 = TC_MASKED, m1 = TC_MASKED, l0 = 0.0f, l1 = 0.0f;
    for (int start = 0; start < nk; start += TC_TILE) {
        int n = min(TC_TILE, nk - start);
        tc_load<D>(k, ks, b, start, n, nk, width, h);
        __syncthreads();
        for (int j0 = 0; j0 < n; j0 += 16) {
            float s[2][4];
            tc_scores<D>(qa, ks, j0, start, nk, q0 + warp * 16, causal, scale, s);
            float new0 = fmaxf(m0, tc_row_max(fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]))));
            float new1 = fmaxf(m1, tc_row_max(fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]))));
            l0 = l0 * __expf(m0 - new0) + __expf(s[0][0] - new0) + __expf(s[0][1] - new0) + __expf(s[1][0] - new0) +
                 __expf(s[1][1] - new0);
            l1 = l1 * __expf(m1 - new1) + __expf(s[0][2] - new1) + __expf(s[0][3] - new1) + __expf(s[1][2] - new1) +
                 __expf(s[1][3] - new1);
            m0 = new0;
            m1 = new1;
        }
        __syncthreads();
    }
    l0 = tc_row_sum(l0);
    l1 = tc_row_sum(l1);
    // delta: each thread of a row group takes a quarter of the row's columns.
    int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    float d0 = 0.0f, d1 = 0.0f;
    for (int c = t; c < D; c += 4) {
        long col = (long)h * D + c;
        if (r0 < nq) d0 += to_f32(go[((long)b * nq + r0) * width + col]) * to_f32(o[((long)b * nq + r0) * width + col]);
        if (r1 < nq) d1 += to_f32(go[((long)b * nq + r1) * width + col]) * to_f32(o[((long)b * nq + r1) * width + col]);
    }
    d0 = tc_row_sum(d0);
    d1 = tc_row_sum(d1);
    if (t == 0) {
        long at = (long)blockIdx.y * nq;
        if (r0 < nq) {
            lse[at + r0] = m0 + logf(l0);
            delta[at + r0] = d0;
        }
        if (r1 < nq) {
            lse[at + r1] = m1 + logf(l1);
            delta[at + r1] = d1;
        }
    }
}

// dq = scale * sum_j p_ij (dO_i . v_j - delta_i) k_j, per warp of 16 queries over key tiles.
template <int D>
__device__ void tc_attention_backward_query(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* go,
                                            const float* lse, const float* delta, bf16_t* dq, int nq, int nk,
                                            int heads, int causal, float scale) {
    __shared__ __align__(16) bf16_t ks[TC_TILE * (D + 8)];
    __shared__ __align__(16) bf16_t vs[TC_TILE * (D + 8)];
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
    int b = blockIdx.y / heads, h = blockIdx.y % heads;
    long width = (long)heads * D;
    int q0 = blockIdx.x * TC_ROWS;
    int rows = min(TC_ROWS, nq - q0);
    tc_load<D>(q, ks, b, q0, rows, nq, width, h);
    tc_load<D>(go, vs, b, q0, rows, nq, width, h);
    __syncthreads();
    unsigned qa[D / 16][4], ga[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        tc_a(ks, D + 8, warp * 16, kk * 16, qa[kk]);
        tc_a(vs, D + 8, warp * 16, kk * 16, ga[kk]);
    }
    __syncthreads();
    int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    long at = (long)blockIdx.y * nq;
    float lse0 = r0 < nq ? lse[at + r0] : 0.0f, lse1 = r1 < nq ? lse[at + r1] : 0.0f;
    float delta0 = r0 < nq ? delta[at + r0] : 0.0f, delta1 = r1 < nq ? delta[at + r1] : 0.0f;
    float acc[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.0f;
    for (int start = 0; start < nk; start += TC_TILE) {
        int n = min(TC_TILE, nk - start);
        tc_load<D>(k, ks, b, start, n, nk, width, h);
        tc_load<D>(v, vs, b, start, n, nk, width, h);
        __syncthreads();
        for (int j0 = 0; j0 < n; j0 += 16) {
            float s[2][4], dp[2][4];
            tc_scores<D>(qa, ks, j0, start, nk, q0 + warp * 16, causal, scale, s);
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    unsigned bv[2];
                    tc_b_transposed(vs, D + 8, j0 + nt * 8, kk * 16, bv);
                    tc_mma(dp[nt], ga[kk], bv);
                }
                // ds = p (dp - delta); masked keys have p = 0.
                s[nt][0] = __expf(s[nt][0] - lse0) * (dp[nt][0] - delta0);
                s[nt][1] = __expf(s[nt][1] - lse0) * (dp[nt][1] - delta0);
                s[nt][2] = __expf(s[nt][2] - lse1) * (dp[nt][2] - delta1);
                s[nt][3] = __expf(s[nt][3] - lse1) * (dp[nt][3] - delta1);
            }
            unsigned da[4] = {tc_pack(s[0][0], s[0][1]), tc_pack(s[0][2], s[0][3]), tc_pack(s[1][0], s[1][1]),
                              tc_pack(s[1][2], s[1][3])};
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                unsigned bk[2];
                tc_b(ks, D + 8, j0, dt * 8, bk);
                tc_mma(acc[dt], da, bk);
            }
        }
        __syncthreads();
    }
    tc_store<D>(dq, acc, b, r0, nq, width, h, scale, scale);
}

// Per warp of 16 keys over query tiles: dv_j = sum_i p_ij dO_i, dk_j = scale * sum_i p_ij
// (dO_i . v_j - delta_i) q_i, with the transposed scores k q^T so the keys are the rows.
template <int D>
__device__ void tc_attention_backward_key(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* go,
                                          const float* lse, const float* delta, bf16_t* dk, bf16_t* dv, int nq,
                                          int nk, int heads, int causal, float scale) {
    __shared__ __align__(16) bf16_t qs[TC_TILE * (D + 8)];
    __shared__ __align__(16) bf16_t gs[TC_TILE * (D + 8)];
    __shared__ float lse_s[TC_TILE], delta_s[TC_TILE];
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    int b = blockIdx.y / heads, h = blockIdx.y % heads;
    long width = (long)heads * D;
    int k0 = blockIdx.x * TC_ROWS;
    int rows = min(TC_ROWS, nk - k0);
    tc_load<D>(k, qs, b, k0, rows, nk, width, h);
    tc_load<D>(v, gs, b, k0, rows, nk, width, h);
    __syncthreads();
    unsigned ka[D / 16][4], va[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        tc_a(qs, D + 8, warp * 16, kk * 16, ka[kk]);
        tc_a(gs, D + 8, warp * 16, kk * 16, va[kk]);
    }
    __syncthreads();
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
        dka[dt][0] = dka[dt][1] = dka[dt][2] = dka[dt][3] = 0.0f;
        dva[dt][0] = dva[dt][1] = dva[dt][2] = dva[dt][3] = 0.0f;
    }
    for (int start = 0; start < nq; start += TC_TILE) {
        int n = min(TC_TILE, nq - start);
        tc_load<D>(q, qs, b, start, n, nq, width, h);
        tc_load<D>(go, gs, b, start, n, nq, width, h);
        for (int r = threadIdx.x; r < TC_TILE; r += blockDim.x) {
            long at = (long)blockIdx.y * nq + start + r;
            // Queries past nq: an infinite log-sum-exp makes their probabilities 0.
            lse_s[r] = r < n ? lse[at] : -TC_MASKED;
            delta_s[r] = r < n ? delta[at] : 0.0f;
        }
        __syncthreads();
        for (int i0 = 0; i0 < n; i0 += 16) {
            float p[2][4], dp[2][4];
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                p[nt][0] = p[nt][1] = p[nt][2] = p[nt][3] = 0.0f;
                dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    unsigned bq[2], bg[2];
                    tc_b_transposed(qs, D + 8, i0 + nt * 8, kk * 16, bq);
                    tc_mma(p[nt], ka[kk], bq);
                    tc_b_transposed(gs, D + 8, i0 + nt * 8, kk * 16, bg);
                    tc_mma(dp[nt], va[kk], bg);
                }
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int i = i0 + nt * 8 + 2 * t + (e & 1), key = k0 + warp * 16 + g + (e >= 2 ? 8 : 0);
                    float masked = causal && key > start + i ? -TC_MASKED : 0.0f;  // a later key: p = 0
                    p[nt][e] = __expf(p[nt][e] * scale - lse_s[i] - masked);
                    dp[nt][e] = p[nt][e] * (dp[nt][e] - delta_s[i]);  // now dS^T
                }
            }
            unsigned pa[4] = {tc_pack(p[0][0], p[0][1]), tc_pack(p[0][2], p[0][3]), tc_pack(p[1][0], p[1][1]),
                              tc_pack(p[1][2], p[1][3])};
            unsigned da[4] = {tc_pack(dp[0][0], dp[0][1]), tc_pack(dp[0][2], dp[0][3]), tc_pack(dp[1][0], dp[1][1]),
                              tc_pack(dp[1][2], dp[1][3])};
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                unsigned bg[2], bq[2];
                tc_b(gs, D + 8, i0, dt * 8, bg);
                tc_mma(dva[dt], pa, bg);
                tc_b(qs, D + 8, i0, dt * 8, bq);
                tc_mma(dka[dt], da, bq);
            }
        }
        __syncthreads();
    }
    tc_store<D>(dk, dka, b, k0 + warp * 16 + g, nk, width, h, scale, scale);
    tc_store<D>(dv, dva, b, k0 + warp * 16 + g, nk, width, h, 1.0f, 1.0f);
}

// extern "C" entry points of the tensor-core kernels per head size: attention_tc_<pass>_d<D>.
// `causal`: query i attends to keys 0..=i only (CLIP's text encoder).
#define TC_ATTENTION_KERNELS(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                                  \
        attention_tc_forward_d##D(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, int nq, int nk,        \
                                  int heads, int causal, float scale) {                                                \
        tc_attention_forward<D>(q, k, v, o, nq, nk, heads, causal, scale);                                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                                  \
        attention_tc_backward_stats_d##D(const bf16_t* q, const bf16_t* k, const bf16_t* o, const bf16_t* go,          \
                                         float* lse, float* delta, int nq, int nk, int heads, int causal,              \
                                         float scale) {                                                                \
        tc_attention_backward_stats<D>(q, k, o, go, lse, delta, nq, nk, heads, causal, scale);                         \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                                  \
        attention_tc_backward_query_d##D(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* go,          \
                                         const float* lse, const float* delta, bf16_t* dq, int nq, int nk, int heads,  \
                                         int causal, float scale) {                                                    \
        tc_attention_backward_query<D>(q, k, v, go, lse, delta, dq, nq, nk, heads, causal, scale);                     \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                                  \
        attention_tc_backward_key_d##D(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* go,            \
                                       const float* lse, const float* delta, bf16_t* dk, bf16_t* dv, int nq, int nk,   \
                                       int heads, int causal, float scale) {                                           \
        tc_attention_backward_key<D>(q, k, v, go, lse, delta, dk, dv, nq, nk, heads, causal, scale);                   \
    }

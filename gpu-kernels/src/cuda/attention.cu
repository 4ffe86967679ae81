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

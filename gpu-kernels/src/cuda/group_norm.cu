// GroupNorm, optionally followed by SiLU, forward and backward. One block per (sample, group):
// the block reduces the group's mean and variance in f32 (two passes over the group, centred
// second pass), so nothing but the input is kept for the backward pass, which recomputes them.
// x, y, dy and dx are [B, C, spatial]; gamma and beta f32 [C].
#define GN_THREADS 256

// The sum of `v` over the block (every thread gets it). `scratch` holds GN_THREADS floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
        __syncthreads();
    }
    float total = scratch[0];
    __syncthreads();
    return total;
}

// Mean and 1/sqrt(var + eps) of the group starting at `base`.
template <typename T>
__device__ void group_stats(const T* x, long base, long group_len, float eps, float* scratch, float* mean,
                            float* rstd) {
    float sum = 0.0f;
    for (long i = threadIdx.x; i < group_len; i += blockDim.x) sum += to_f32(x[base + i]);
    float m = block_sum(sum, scratch) / (float)group_len;
    float sq = 0.0f;
    for (long i = threadIdx.x; i < group_len; i += blockDim.x) {
        float d = to_f32(x[base + i]) - m;
        sq += d * d;
    }
    *mean = m;
    *rstd = rsqrtf(block_sum(sq, scratch) / (float)group_len + eps);
}

template <typename T>
__device__ void group_norm_forward(const T* x, const float* gamma, const float* beta, T* y, int channels, long spatial,
                                   int groups, float eps, int silu) {
    __shared__ float scratch[GN_THREADS];
    int per_group = channels / groups;
    long group_len = (long)per_group * spatial;
    int b = blockIdx.x / groups, g = blockIdx.x % groups;
    long base = ((long)b * channels + (long)g * per_group) * spatial;
    float mean, rstd;
    group_stats(x, base, group_len, eps, scratch, &mean, &rstd);
    for (long i = threadIdx.x; i < group_len; i += blockDim.x) {
        int c = g * per_group + (int)(i / spatial);
        float v = (to_f32(x[base + i]) - mean) * rstd * gamma[c] + beta[c];
        put(y, base + i, silu ? v / (1.0f + expf(-v)) : v);
    }
}

// With z = xhat * gamma + beta and dz = dy * silu'(z) (or dy without SiLU):
//   dx = rstd * (dz*gamma - mean(dz*gamma) - xhat * mean(dz*gamma*xhat)) over the group,
//   per-sample partial gradients dgamma[b, c] = sum dz * xhat, dbeta[b, c] = sum dz (summed
//   over the batch afterwards, in a fixed order).
__device__ __forceinline__ float gn_dz(float xhat, float dy, float gamma, float beta, int silu) {
    if (!silu) return dy;
    float z = xhat * gamma + beta;
    float s = 1.0f / (1.0f + expf(-z));
    return dy * s * (1.0f + z * (1.0f - s));
}

template <typename T>
__device__ void group_norm_backward(const T* x, const T* dy, const float* gamma, const float* beta, T* dx,
                                    float* dgamma, float* dbeta, int channels, long spatial, int groups, float eps,
                                    int silu) {
    __shared__ float scratch[GN_THREADS];
    int per_group = channels / groups;
    long group_len = (long)per_group * spatial;
    int b = blockIdx.x / groups, g = blockIdx.x % groups;
    long base = ((long)b * channels + (long)g * per_group) * spatial;
    float mean, rstd;
    group_stats(x, base, group_len, eps, scratch, &mean, &rstd);
    float sum_g = 0.0f, sum_gx = 0.0f;  // this thread's share of sum(dz*gamma), sum(dz*gamma*xhat)
    for (int cc = 0; cc < per_group; cc++) {
        int c = g * per_group + cc;
        float gc = gamma[c], bc = beta[c];
        float dg = 0.0f, db = 0.0f;
        long start = base + (long)cc * spatial;
        for (long i = threadIdx.x; i < spatial; i += blockDim.x) {
            float xhat = (to_f32(x[start + i]) - mean) * rstd;
            float dz = gn_dz(xhat, to_f32(dy[start + i]), gc, bc, silu);
            dg += dz * xhat;
            db += dz;
        }
        dg = block_sum(dg, scratch);
        db = block_sum(db, scratch);
        if (threadIdx.x == 0) {
            dgamma[(long)b * channels + c] = dg;
            dbeta[(long)b * channels + c] = db;
        }
        sum_g += gc * db;
        sum_gx += gc * dg;
    }
    // Every thread holds the block totals here (block_sum hands them to all threads).
    float mean_g = sum_g / (float)group_len, mean_gx = sum_gx / (float)group_len;
    for (long i = threadIdx.x; i < group_len; i += blockDim.x) {
        int c = g * per_group + (int)(i / spatial);
        float xhat = (to_f32(x[base + i]) - mean) * rstd;
        float dz = gn_dz(xhat, to_f32(dy[base + i]), gamma[c], beta[c], silu);
        put(dx, base + i, rstd * (dz * gamma[c] - mean_g - xhat * mean_gx));
    }
}

extern "C" __global__ void group_norm_forward_f32(const float* x, const float* gamma, const float* beta, float* y,
                                                  int channels, long spatial, int groups, float eps, int silu) {
    group_norm_forward(x, gamma, beta, y, channels, spatial, groups, eps, silu);
}

extern "C" __global__ void group_norm_forward_bf16(const bf16_t* x, const float* gamma, const float* beta, bf16_t* y,
                                                   int channels, long spatial, int groups, float eps, int silu) {
    group_norm_forward(x, gamma, beta, y, channels, spatial, groups, eps, silu);
}

extern "C" __global__ void group_norm_backward_f32(const float* x, const float* dy, const float* gamma,
                                                   const float* beta, float* dx, float* dgamma, float* dbeta,
                                                   int channels, long spatial, int groups, float eps, int silu) {
    group_norm_backward(x, dy, gamma, beta, dx, dgamma, dbeta, channels, spatial, groups, eps, silu);
}

extern "C" __global__ void group_norm_backward_bf16(const bf16_t* x, const bf16_t* dy, const float* gamma,
                                                    const float* beta, bf16_t* dx, float* dgamma, float* dbeta,
                                                    int channels, long spatial, int groups, float eps, int silu) {
    group_norm_backward(x, dy, gamma, beta, dx, dgamma, dbeta, channels, spatial, groups, eps, silu);
}

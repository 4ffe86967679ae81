// LayerNorm over the last dimension, forward and backward. x, y, dy and dx are [rows, d]; gamma
// and beta f32 [d]. Each row belongs to one warp (statistics in f32 by warp shuffles, two
// passes, the second centred); the backward recomputes them from the input, so nothing but the
// input is kept for it, and writes per-block partial sums of the parameter gradients
// ([gridDim.x, d], added over blocks afterwards in a fixed order).
#define LN_MAX_D 1280
#define LN_BACKWARD_WARPS 4

__device__ __forceinline__ float ln_warp_sum(float v) {
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

// Mean and 1/sqrt(var + eps) of row `xr` (every lane of the warp gets them).
template <typename T>
__device__ __forceinline__ void ln_stats(const T* xr, int d, float eps, float* mean, float* rstd) {
    int lane = threadIdx.x % 32;
    float sum = 0.0f;
    for (int c = lane; c < d; c += 32) sum += to_f32(xr[c]);
    float m = ln_warp_sum(sum) / (float)d;
    float sq = 0.0f;
    for (int c = lane; c < d; c += 32) {
        float v = to_f32(xr[c]) - m;
        sq += v * v;
    }
    *mean = m;
    *rstd = rsqrtf(ln_warp_sum(sq) / (float)d + eps);
}

template <typename T>
__device__ void layer_norm_forward(const T* x, const float* gamma, const float* beta, T* y, long rows, int d,
                                   float eps) {
    int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    for (long r = (long)blockIdx.x * warps + threadIdx.x / 32; r < rows; r += (long)gridDim.x * warps) {
        const T* xr = x + r * d;
        float mean, rstd;
        ln_stats(xr, d, eps, &mean, &rstd);
        for (int c = lane; c < d; c += 32) put(y, r * d + c, (to_f32(xr[c]) - mean) * rstd * gamma[c] + beta[c]);
    }
}

// dx = rstd (gamma dy - mean(gamma dy) - xhat mean(gamma dy xhat)) per row; dgamma = sum dy xhat,
// dbeta = sum dy over the block's rows. Blocks of LN_BACKWARD_WARPS warps; d <= LN_MAX_D.
template <typename T>
__device__ void layer_norm_backward(const T* x, const T* dy, const float* gamma, T* dx, float* dgamma, float* dbeta,
                                    long rows, int d, float eps) {
    __shared__ float partial[LN_BACKWARD_WARPS][2][LN_MAX_D];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int c = lane; c < d; c += 32) partial[warp][0][c] = partial[warp][1][c] = 0.0f;
    for (long r = (long)blockIdx.x * LN_BACKWARD_WARPS + warp; r < rows; r += (long)gridDim.x * LN_BACKWARD_WARPS) {
        const T* xr = x + r * d;
        const T* dyr = dy + r * d;
        float mean, rstd;
        ln_stats(xr, d, eps, &mean, &rstd);
        float sum_g = 0.0f, sum_gx = 0.0f;
        for (int c = lane; c < d; c += 32) {
            float xhat = (to_f32(xr[c]) - mean) * rstd, g = to_f32(dyr[c]);
            sum_g += gamma[c] * g;
            sum_gx += gamma[c] * g * xhat;
            partial[warp][0][c] += g * xhat;
            partial[warp][1][c] += g;
        }
        float mean_g = ln_warp_sum(sum_g) / (float)d, mean_gx = ln_warp_sum(sum_gx) / (float)d;
        for (int c = lane; c < d; c += 32) {
            float xhat = (to_f32(xr[c]) - mean) * rstd;
            put(dx, r * d + c, rstd * (gamma[c] * to_f32(dyr[c]) - mean_g - xhat * mean_gx));
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float g = 0.0f, b = 0.0f;
        for (int w = 0; w < LN_BACKWARD_WARPS; w++) {
            g += partial[w][0][c];
            b += partial[w][1][c];
        }
        dgamma[(long)blockIdx.x * d + c] = g;
        dbeta[(long)blockIdx.x * d + c] = b;
    }
}

extern "C" __global__ void layer_norm_forward_f32(const float* x, const float* gamma, const float* beta, float* y,
                                                  long rows, int d, float eps) {
    layer_norm_forward(x, gamma, beta, y, rows, d, eps);
}

extern "C" __global__ void layer_norm_forward_bf16(const bf16_t* x, const float* gamma, const float* beta, bf16_t* y,
                                                   long rows, int d, float eps) {
    layer_norm_forward(x, gamma, beta, y, rows, d, eps);
}

extern "C" __global__ void layer_norm_backward_f32(const float* x, const float* dy, const float* gamma, float* dx,
                                                   float* dgamma, float* dbeta, long rows, int d, float eps) {
    layer_norm_backward(x, dy, gamma, dx, dgamma, dbeta, rows, d, eps);
}

extern "C" __global__ void layer_norm_backward_bf16(const bf16_t* x, const bf16_t* dy, const float* gamma, bf16_t* dx,
                                                    float* dgamma, float* dbeta, long rows, int d, float eps) {
    layer_norm_backward(x, dy, gamma, dx, dgamma, dbeta, rows, d, eps);
}

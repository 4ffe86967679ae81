// GroupNorm followed by SiLU in one kernel (inference: VAE encoding, sampling): one block per
// (sample, group) reduces mean and variance in f32, then normalises, applies the affine and
// SiLU in the same pass over the group. x and y are [B, C, spatial].
#define GN_THREADS 256

template <typename T>
__device__ void group_norm_silu(const T* x, const float* gamma, const float* beta, T* y, int channels, long spatial,
                                int groups, float eps) {
    __shared__ float partial[2][GN_THREADS];
    int per_group = channels / groups;
    long group_len = (long)per_group * spatial;
    int b = blockIdx.x / groups, g = blockIdx.x % groups;
    long base = ((long)b * channels + (long)g * per_group) * spatial;
    float sum = 0.0f;
    for (long i = threadIdx.x; i < group_len; i += blockDim.x) sum += to_f32(x[base + i]);
    partial[0][threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[0][threadIdx.x] += partial[0][threadIdx.x + s];
        __syncthreads();
    }
    float mean = partial[0][0] / (float)group_len;
    float sq = 0.0f;
    for (long i = threadIdx.x; i < group_len; i += blockDim.x) {
        float d = to_f32(x[base + i]) - mean;
        sq += d * d;
    }
    partial[1][threadIdx.x] = sq;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[1][threadIdx.x] += partial[1][threadIdx.x + s];
        __syncthreads();
    }
    float rstd = rsqrtf(partial[1][0] / (float)group_len + eps);
    for (long i = threadIdx.x; i < group_len; i += blockDim.x) {
        int c = g * per_group + (int)(i / spatial);
        float v = (to_f32(x[base + i]) - mean) * rstd * gamma[c] + beta[c];
        put(y, base + i, v / (1.0f + expf(-v)));
    }
}

extern "C" __global__ void group_norm_silu_f32(const float* x, const float* gamma, const float* beta, float* y,
                                               int channels, long spatial, int groups, float eps) {
    group_norm_silu(x, gamma, beta, y, channels, spatial, groups, eps);
}

extern "C" __global__ void group_norm_silu_bf16(const bf16_t* x, const float* gamma, const float* beta, bf16_t* y,
                                                int channels, long spatial, int groups, float eps) {
    group_norm_silu(x, gamma, beta, y, channels, spatial, groups, eps);
}

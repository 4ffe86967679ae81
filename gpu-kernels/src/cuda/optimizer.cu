// AdamW and EMA over many tensors in one launch (multi-tensor apply): `offsets` holds the
// prefix sums of the tensors' lengths and each thread finds its tensor by binary search, so a
// whole parameter group is one launch instead of ~10 element-wise kernels per tensor.

__device__ __forceinline__ int tensor_of(const long* offsets, int tensors, long i) {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// torch.optim.AdamW's operation order, in f32, on the gradient times `grad_scale` (the
// clipping coefficient, as clip_grad_norm_ multiplies the gradients in place): p *= 1 - lr wd; m = lerp(m, g, 1 - b1);
// v = v b2 + ((1 - b2) g) g; p += (-step_size m) / (sqrt(v) / bc2_sqrt + eps). Optionally
// writes a bf16 working copy of each updated parameter.
extern "C" __global__ void adamw_multi(const unsigned long long* params, const unsigned long long* grads,
                                       const unsigned long long* exp_avgs, const unsigned long long* exp_avg_sqs,
                                       const unsigned long long* bf16_copies, const long* offsets, int tensors,
                                       long total, float decay_factor, float one_minus_beta1, float beta2,
                                       float one_minus_beta2, float neg_step_size, float bias_correction2_sqrt,
                                       float eps, float grad_scale) {
    GRID_STRIDE(i, total) {
        int t = tensor_of(offsets, tensors, i);
        long j = i - offsets[t];
        float* p = (float*)params[t];
        const float* g = (const float*)grads[t];
        float* m = (float*)exp_avgs[t];
        float* v = (float*)exp_avg_sqs[t];
        float grad = g[j] * grad_scale;
        float param = p[j] * decay_factor;
        float mj = m[j];
        mj = mj + one_minus_beta1 * (grad - mj);
        float vj = v[j] * beta2 + (one_minus_beta2 * grad) * grad;
        float denom = sqrtf(vj) / bias_correction2_sqrt + eps;
        param = param + (neg_step_size * mj) / denom;
        p[j] = param;
        m[j] = mj;
        v[j] = vj;
        if (bf16_copies[t] != 0) ((bf16_t*)bf16_copies[t])[j] = f32_to_bf16(param);
    }
}

// diffusers' EMAModel step: shadow -= (1 - decay) (shadow - param).
extern "C" __global__ void ema_multi(const unsigned long long* shadows, const unsigned long long* params,
                                     const long* offsets, int tensors, long total, float one_minus_decay) {
    GRID_STRIDE(i, total) {
        int t = tensor_of(offsets, tensors, i);
        long j = i - offsets[t];
        float* s = (float*)shadows[t];
        const float* p = (const float*)params[t];
        float sj = s[j];
        s[j] = sj - one_minus_decay * (sj - p[j]);
    }
}

// Sums of squares of chunks of f32 tensors, for the global gradient norm without a host round
// trip per tensor: block c sums the squares of the chunk_lens[c] values at chunk_ptrs[c].
// Blocks of 256 threads.
extern "C" __global__ void sum_squares_chunks(const unsigned long long* chunk_ptrs, const int* chunk_lens,
                                              float* sums) {
    __shared__ float scratch[256];
    const float* x = (const float*)chunk_ptrs[blockIdx.x];
    int n = chunk_lens[blockIdx.x];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = x[i];
        s += v * v;
    }
    scratch[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) scratch[threadIdx.x] += scratch[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) sums[blockIdx.x] = scratch[0];
}

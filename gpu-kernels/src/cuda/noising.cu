// The forward diffusion for a batch with per-sample timesteps, and the training target, in one
// pass: noisy = sqrt(a_t) x0 + sqrt(1 - a_t) noise; target = noise (epsilon) or
// sqrt(a_t) noise - sqrt(1 - a_t) x0 (v). The per-sample coefficients come from the host, in
// f32 as the CPU path computes them; compiled without FMA contraction so each product is
// rounded as in the CPU reference.
extern "C" __global__ void noise_and_target_f32(const float* x0, const float* noise, const float* sqrt_alpha,
                                                const float* sqrt_one_minus_alpha, float* noisy, float* target,
                                                long per_sample, long total, int v_prediction) {
    GRID_STRIDE(i, total) {
        long b = i / per_sample;
        float a = sqrt_alpha[b], s = sqrt_one_minus_alpha[b];
        float x = x0[i], n = noise[i];
        noisy[i] = a * x + s * n;
        target[i] = v_prediction ? a * n - s * x : n;
    }
}

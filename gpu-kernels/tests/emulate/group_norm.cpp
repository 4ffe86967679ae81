// Runs the GroupNorm kernels of src/cuda/group_norm.cu (forward and backward, with and without
// SiLU, f32 and bf16) on the CPU with host_cuda.h, against a double-precision reference whose
// gradients are checked by central differences of its own forward pass. Built and run by
// tests/kernel_emulation.rs. Exit status 0 when every case is within tolerance.
#include "host_cuda.h"
#include "common.cuh"
#include "group_norm.cu"

struct Case {
    int batch, channels, spatial, groups;
    bool silu;
};

// y = GroupNorm(x) * gamma + beta, then SiLU; in double.
static std::vector<double> forward(const std::vector<double>& x, const std::vector<double>& gamma,
                                   const std::vector<double>& beta, Case c, double eps) {
    int per = c.channels / c.groups;
    long n = (long)per * c.spatial;
    std::vector<double> y(x.size());
    for (int b = 0; b < c.batch; b++)
        for (int g = 0; g < c.groups; g++) {
            long base = ((long)b * c.channels + (long)g * per) * c.spatial;
            double mean = 0, var = 0;
            for (long i = 0; i < n; i++) mean += x[base + i];
            mean /= n;
            for (long i = 0; i < n; i++) var += (x[base + i] - mean) * (x[base + i] - mean);
            double rstd = 1.0 / std::sqrt(var / n + eps);
            for (long i = 0; i < n; i++) {
                int ch = g * per + (int)(i / c.spatial);
                double z = (x[base + i] - mean) * rstd * gamma[ch] + beta[ch];
                y[base + i] = c.silu ? z / (1.0 + std::exp(-z)) : z;
            }
        }
    return y;
}

static double loss(const std::vector<double>& y, const std::vector<double>& dy) {
    double s = 0;
    for (size_t i = 0; i < y.size(); i++) s += y[i] * dy[i];
    return s;
}

template <typename T>
static int run_case(Case c, bool bf16) {
    long len = (long)c.batch * c.channels * c.spatial;
    unsigned state = 12345u + c.channels;
    auto random = [&](long n, double scale, double offset) {
        std::vector<double> v(n);
        for (auto& x : v) {
            state = state * 1664525u + 1013904223u;
            double u = (double)(state >> 8) / (double)(1u << 24) * 2.0 - 1.0;
            x = u * scale + offset;
            if (bf16) x = to_f32(f32_to_bf16((float)x));
        }
        return v;
    };
    auto x = random(len, 2.0, 0.3), dy = random(len, 1.0, 0.0);
    auto gamma = random(c.channels, 1.0, 0.2), beta = random(c.channels, 0.5, 0.0);
    double eps = 1e-5;
    std::vector<T> xd(len), dyd(len), yd(len), dxd(len);
    std::vector<float> gf(gamma.begin(), gamma.end()), bf(beta.begin(), beta.end());
    std::vector<float> dgamma((long)c.batch * c.channels), dbeta(dgamma.size());
    for (long i = 0; i < len; i++) {
        if constexpr (sizeof(T) == 2) {
            xd[i] = f32_to_bf16((float)x[i]);
            dyd[i] = f32_to_bf16((float)dy[i]);
        } else {
            xd[i] = (float)x[i];
            dyd[i] = (float)dy[i];
        }
    }
    int silu = c.silu;
    auto fwd = [&] {
        if constexpr (sizeof(T) == 2) {
            group_norm_forward_bf16(xd.data(), gf.data(), bf.data(), yd.data(), c.channels, c.spatial, c.groups,
                                    (float)eps, silu);
        } else {
            group_norm_forward_f32(xd.data(), gf.data(), bf.data(), yd.data(), c.channels, c.spatial, c.groups,
                                   (float)eps, silu);
        }
    };
    auto bwd = [&] {
        if constexpr (sizeof(T) == 2) {
            group_norm_backward_bf16(xd.data(), dyd.data(), gf.data(), bf.data(), dxd.data(), dgamma.data(),
                                     dbeta.data(), c.channels, c.spatial, c.groups, (float)eps, silu);
        } else {
            group_norm_backward_f32(xd.data(), dyd.data(), gf.data(), bf.data(), dxd.data(), dgamma.data(),
                                    dbeta.data(), c.channels, c.spatial, c.groups, (float)eps, silu);
        }
    };
    launch(c.batch * c.groups, 1, GN_THREADS, fwd);
    launch(c.batch * c.groups, 1, GN_THREADS, bwd);

    // Reference gradients by central differences of the double forward pass.
    const double h = 1e-4;
    auto numeric = [&](std::vector<double>& v, long i, auto&& f) {
        double keep = v[i];
        v[i] = keep + h;
        double up = f();
        v[i] = keep - h;
        double down = f();
        v[i] = keep;
        return (up - down) / (2 * h);
    };
    auto l = [&] { return loss(forward(x, gamma, beta, c, eps), dy); };
    auto want_y = forward(x, gamma, beta, c, eps);
    int failures = 0;
    auto check = [&](const char* name, double worst, double scale, double tolerance) {
        bool ok = worst <= tolerance * scale;
        std::printf("%s silu %d %dx%dx%d/%d %s: max abs error %.2e (scale %.2f) %s\n", bf16 ? "bf16" : "f32", c.silu,
                    c.batch, c.channels, c.spatial, c.groups, name, worst, scale, ok ? "ok" : "FAILED");
        failures += !ok;
    };
    double tolerance = bf16 ? 2e-2 : 2e-4;
    double worst = 0, scale = 1;
    for (long i = 0; i < len; i++) {
        worst = std::max(worst, std::fabs(to_f32(yd[i]) - want_y[i]));
        scale = std::max(scale, std::fabs(want_y[i]));
    }
    check("y", worst, scale, tolerance);
    worst = 0, scale = 0.1;
    for (long i = 0; i < len; i += 7) {  // every 7th input: each needs two forward passes
        double want = numeric(x, i, l);
        worst = std::max(worst, std::fabs(to_f32(dxd[i]) - want));
        scale = std::max(scale, std::fabs(want));
    }
    check("dx", worst, scale, tolerance);
    double worst_g = 0, worst_b = 0, scale_g = 0.1, scale_b = 0.1;
    for (int ch = 0; ch < c.channels; ch++) {
        double got_g = 0, got_b = 0;
        for (int b = 0; b < c.batch; b++) {
            got_g += dgamma[(long)b * c.channels + ch];
            got_b += dbeta[(long)b * c.channels + ch];
        }
        double want_g = numeric(gamma, ch, l), want_b = numeric(beta, ch, l);
        worst_g = std::max(worst_g, std::fabs(got_g - want_g));
        worst_b = std::max(worst_b, std::fabs(got_b - want_b));
        scale_g = std::max(scale_g, std::fabs(want_g));
        scale_b = std::max(scale_b, std::fabs(want_b));
    }
    check("dgamma", worst_g, scale_g, tolerance);
    check("dbeta", worst_b, scale_b, tolerance);
    return failures;
}

int main() {
    int failures = 0;
    for (bool silu : {true, false}) {
        // Spatial sizes that are and are not multiples of the block, one and several channels
        // per group.
        failures += run_case<float>({2, 8, 37, 4, silu}, false);
        failures += run_case<float>({1, 64, 300, 8, silu}, false);
        failures += run_case<bf16_t>({2, 16, 45, 4, silu}, true);
    }
    std::printf("%s\n", failures ? "FAILED" : "all cases within tolerance");
    return failures ? 1 : 0;
}

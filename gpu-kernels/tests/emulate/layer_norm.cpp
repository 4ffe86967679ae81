// Runs the LayerNorm kernels of src/cuda/layer_norm.cu (forward and backward, f32 and bf16) on
// the CPU with host_cuda.h, against a double-precision reference whose gradients are central
// differences of its own forward pass. Built and run by tests/kernel_emulation.rs. Exit status 0
// when every case is within tolerance.
#include "host_cuda.h"
#include "common.cuh"
#include "layer_norm.cu"

static std::vector<double> forward(const std::vector<double>& x, const std::vector<double>& gamma,
                                   const std::vector<double>& beta, long rows, int d, double eps) {
    std::vector<double> y(x.size());
    for (long r = 0; r < rows; r++) {
        double mean = 0, var = 0;
        for (int c = 0; c < d; c++) mean += x[r * d + c];
        mean /= d;
        for (int c = 0; c < d; c++) var += (x[r * d + c] - mean) * (x[r * d + c] - mean);
        double rstd = 1.0 / std::sqrt(var / d + eps);
        for (int c = 0; c < d; c++) y[r * d + c] = (x[r * d + c] - mean) * rstd * gamma[c] + beta[c];
    }
    return y;
}

template <typename T>
static int run_case(long rows, int d, int blocks) {
    constexpr bool bf16 = sizeof(T) == 2;
    long len = rows * d;
    unsigned state = 777u + d;
    auto random = [&](long n, double scale, double offset) {
        std::vector<double> v(n);
        for (auto& x : v) {
            state = state * 1664525u + 1013904223u;
            x = ((double)(state >> 8) / (double)(1u << 24) * 2.0 - 1.0) * scale + offset;
            if (bf16) x = to_f32(f32_to_bf16((float)x));
        }
        return v;
    };
    auto x = random(len, 2.0, 0.4), dy = random(len, 1.0, 0.0);
    auto gamma = random(d, 1.0, 0.5), beta = random(d, 0.5, 0.0);
    double eps = 1e-5;
    std::vector<T> xd(len), dyd(len), yd(len), dxd(len);
    for (long i = 0; i < len; i++) {
        if constexpr (bf16) {
            xd[i] = f32_to_bf16((float)x[i]);
            dyd[i] = f32_to_bf16((float)dy[i]);
        } else {
            xd[i] = (float)x[i];
            dyd[i] = (float)dy[i];
        }
    }
    std::vector<float> gf(gamma.begin(), gamma.end()), bf(beta.begin(), beta.end());
    std::vector<float> dgamma((long)blocks * d), dbeta(dgamma.size());
    launch((int)((rows + 7) / 8), 1, 256, [&] {
        if constexpr (bf16) {
            layer_norm_forward_bf16(xd.data(), gf.data(), bf.data(), yd.data(), rows, d, (float)eps);
        } else {
            layer_norm_forward_f32(xd.data(), gf.data(), bf.data(), yd.data(), rows, d, (float)eps);
        }
    });
    launch(blocks, 1, 32 * LN_BACKWARD_WARPS, [&] {
        if constexpr (bf16) {
            layer_norm_backward_bf16(xd.data(), dyd.data(), gf.data(), dxd.data(), dgamma.data(), dbeta.data(), rows, d,
                                     (float)eps);
        } else {
            layer_norm_backward_f32(xd.data(), dyd.data(), gf.data(), dxd.data(), dgamma.data(), dbeta.data(), rows, d,
                                    (float)eps);
        }
    });
    auto loss = [&] {
        auto y = forward(x, gamma, beta, rows, d, eps);
        double s = 0;
        for (long i = 0; i < len; i++) s += y[i] * dy[i];
        return s;
    };
    const double h = 1e-4;
    auto numeric = [&](std::vector<double>& v, long i) {
        double keep = v[i];
        v[i] = keep + h;
        double up = loss();
        v[i] = keep - h;
        double down = loss();
        v[i] = keep;
        return (up - down) / (2 * h);
    };
    int failures = 0;
    double tolerance = bf16 ? 2e-2 : 2e-4;
    auto check = [&](const char* name, double worst, double scale) {
        bool ok = worst <= tolerance * scale;
        std::printf("%s %ldx%d %s: max abs error %.2e (scale %.2f) %s\n", bf16 ? "bf16" : "f32", rows, d, name, worst,
                    scale, ok ? "ok" : "FAILED");
        failures += !ok;
    };
    auto want = forward(x, gamma, beta, rows, d, eps);
    double worst = 0, scale = 1;
    for (long i = 0; i < len; i++) {
        worst = std::max(worst, std::fabs(to_f32(yd[i]) - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
    }
    check("y", worst, scale);
    worst = 0, scale = 0.1;
    for (long i = 0; i < len; i += 5) {
        double w = numeric(x, i);
        worst = std::max(worst, std::fabs(to_f32(dxd[i]) - w));
        scale = std::max(scale, std::fabs(w));
    }
    check("dx", worst, scale);
    double worst_g = 0, worst_b = 0, scale_g = 0.1, scale_b = 0.1;
    for (int c = 0; c < d; c++) {
        double g = 0, b = 0;
        for (int k = 0; k < blocks; k++) {
            g += dgamma[(long)k * d + c];
            b += dbeta[(long)k * d + c];
        }
        double wg = numeric(gamma, c), wb = numeric(beta, c);
        worst_g = std::max(worst_g, std::fabs(g - wg));
        worst_b = std::max(worst_b, std::fabs(b - wb));
        scale_g = std::max(scale_g, std::fabs(wg));
        scale_b = std::max(scale_b, std::fabs(wb));
    }
    check("dgamma", worst_g, scale_g);
    check("dbeta", worst_b, scale_b);
    return failures;
}

int main() {
    int failures = 0;
    // Widths below, at and between multiples of the warp, rows that do not fill the last block.
    failures += run_case<float>(13, 40, 3);
    failures += run_case<float>(9, 96, 2);
    failures += run_case<bf16_t>(11, 70, 3);
    std::printf("%s\n", failures ? "FAILED" : "all cases within tolerance");
    return failures ? 1 : 0;
}

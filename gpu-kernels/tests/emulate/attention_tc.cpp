// Runs the tensor-core attention kernels of src/cuda/attention.cu on the CPU: each block's 128
// threads are host threads in lockstep at barriers, shuffles go through per-warp slots, and
// `mma.sync.m16n8k16` is emulated warp-wide from the PTX ISA's fragment layouts. That tests all
// of the kernels' own indexing (fragments, masking, online softmax, tiles, stores) against a
// double-precision reference without a GPU; only the hardware's side of the layouts is taken on
// trust (bench/gpu/run.sh checks it on a GPU). Built and run by tests/kernel_emulation.rs:
//   c++ -std=c++20 -O2 -pthread -I src/cuda tests/emulate/attention_tc.cpp && ./a.out
// Exit status 0 when every case is within bf16 tolerance; each case prints its errors.

#include "host_cuda.h"
#include "common.cuh"

// ---- mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, one warp at a time.
static unsigned mma_a[MAX_WARPS][32][4], mma_b[MAX_WARPS][32][2];

static inline float bf16_bits_to_f32(unsigned bits) { return __uint_as_float((bits & 0xffffu) << 16); }

#define LATENTFLOW_EMULATED_MMA
static inline void tc_mma(float* c, const unsigned* a, const unsigned* b) {
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::memcpy(mma_a[w][lane], a, sizeof(unsigned) * 4);
    std::memcpy(mma_b[w][lane], b, sizeof(unsigned) * 2);
    warp_barrier[w]->arrive_and_wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        int g = l / 4, t = l % 4;
        const unsigned* ra = mma_a[w][l];
        int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int r = 0; r < 4; r++) {
            A[rows[r]][cols[r]] = bf16_bits_to_f32(ra[r]);
            A[rows[r]][cols[r] + 1] = bf16_bits_to_f32(ra[r] >> 16);
        }
        const unsigned* rb = mma_b[w][l];
        B[2 * t][g] = bf16_bits_to_f32(rb[0]);
        B[2 * t + 1][g] = bf16_bits_to_f32(rb[0] >> 16);
        B[2 * t + 8][g] = bf16_bits_to_f32(rb[1]);
        B[2 * t + 9][g] = bf16_bits_to_f32(rb[1] >> 16);
    }
    int g = lane / 4, t = lane % 4;
    int out_rows[4] = {g, g, g + 8, g + 8}, out_cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int e = 0; e < 4; e++) {
        float sum = 0.0f;
        for (int k = 0; k < 16; k++) sum += A[out_rows[e]][k] * B[k][out_cols[e]];
        c[e] += sum;
    }
    warp_barrier[w]->arrive_and_wait();
}

#include "attention.cu"
TC_ATTENTION_KERNELS(16)
TC_ATTENTION_KERNELS(64)

// ---- The reference, in double.
struct Shape {
    int batch, heads, d, nq, nk;
    bool causal;
    long at(int b, int r, int rows, int h, int c) const { return ((long)b * rows + r) * heads * d + (long)h * d + c; }
};

static std::vector<double> probabilities(const std::vector<float>& q, const std::vector<float>& k, const Shape& s,
                                         int b, int h, int i) {
    double scale = 1.0 / std::sqrt((double)s.d), top = -1e300;
    std::vector<double> p(s.nk);
    for (int j = 0; j < s.nk; j++) {
        double dot = 0;
        for (int c = 0; c < s.d; c++) dot += (double)q[s.at(b, i, s.nq, h, c)] * k[s.at(b, j, s.nk, h, c)];
        p[j] = dot * scale;
        if (!(s.causal && j > i)) top = std::max(top, p[j]);
    }
    double total = 0;
    for (int j = 0; j < s.nk; j++) total += (p[j] = s.causal && j > i ? 0.0 : std::exp(p[j] - top));
    for (auto& v : p) v /= total;
    return p;
}

static float bf16_round(float v) { return to_f32(f32_to_bf16(v)); }

static int run_case(Shape s, unsigned seed) {
    long nq_len = (long)s.batch * s.nq * s.heads * s.d, nk_len = (long)s.batch * s.nk * s.heads * s.d;
    auto random = [&](long n, unsigned salt) {
        std::vector<float> x(n);
        unsigned state = seed * 2654435761u + salt;
        for (auto& v : x) {
            state = state * 1664525u + 1013904223u;
            v = bf16_round((float)(state >> 8) / (float)(1u << 24) * 2.0f - 1.0f);
        }
        return x;
    };
    auto q = random(nq_len, 1), k = random(nk_len, 2), v = random(nk_len, 3), go = random(nq_len, 4);
    auto to_bf16 = [](const std::vector<float>& x) {
        std::vector<bf16_t> out(x.size());
        for (size_t i = 0; i < x.size(); i++) out[i] = f32_to_bf16(x[i]);
        return out;
    };
    auto qb = to_bf16(q), kb = to_bf16(k), vb = to_bf16(v), gob = to_bf16(go);
    std::vector<bf16_t> ob(nq_len), dqb(nq_len), dkb(nk_len), dvb(nk_len);
    std::vector<float> lse((long)s.batch * s.heads * s.nq), delta(lse.size());
    float scale = 1.0f / std::sqrt((float)s.d);
    int qblocks = (s.nq + 63) / 64, kblocks = (s.nk + 63) / 64, bh = s.batch * s.heads;
    auto forward = s.d == 16 ? attention_tc_forward_d16 : attention_tc_forward_d64;
    auto stats = s.d == 16 ? attention_tc_backward_stats_d16 : attention_tc_backward_stats_d64;
    auto query = s.d == 16 ? attention_tc_backward_query_d16 : attention_tc_backward_query_d64;
    auto key = s.d == 16 ? attention_tc_backward_key_d16 : attention_tc_backward_key_d64;
    launch(qblocks, bh, 128, [&] { forward(qb.data(), kb.data(), vb.data(), ob.data(), s.nq, s.nk, s.heads, s.causal, scale); });
    launch(qblocks, bh, 128, [&] {
        stats(qb.data(), kb.data(), ob.data(), gob.data(), lse.data(), delta.data(), s.nq, s.nk, s.heads, s.causal,
              scale);
    });
    launch(qblocks, bh, 128, [&] {
        query(qb.data(), kb.data(), vb.data(), gob.data(), lse.data(), delta.data(), dqb.data(), s.nq, s.nk, s.heads,
              s.causal, scale);
    });
    launch(kblocks, bh, 128, [&] {
        key(qb.data(), kb.data(), vb.data(), gob.data(), lse.data(), delta.data(), dkb.data(), dvb.data(), s.nq, s.nk,
            s.heads, s.causal, scale);
    });

    std::vector<double> o(nq_len), dq(nq_len), dk(nk_len), dv(nk_len);
    double dscale = 1.0 / std::sqrt((double)s.d);
    for (int b = 0; b < s.batch; b++)
        for (int h = 0; h < s.heads; h++)
            for (int i = 0; i < s.nq; i++) {
                auto p = probabilities(q, k, s, b, h, i);
                double dl = 0;
                for (int c = 0; c < s.d; c++) {
                    double acc = 0;
                    for (int j = 0; j < s.nk; j++) acc += p[j] * v[s.at(b, j, s.nk, h, c)];
                    o[s.at(b, i, s.nq, h, c)] = acc;
                    dl += acc * go[s.at(b, i, s.nq, h, c)];
                }
                for (int j = 0; j < s.nk; j++) {
                    double dp = 0;
                    for (int c = 0; c < s.d; c++) dp += (double)go[s.at(b, i, s.nq, h, c)] * v[s.at(b, j, s.nk, h, c)];
                    double ds = p[j] * (dp - dl);
                    for (int c = 0; c < s.d; c++) {
                        dq[s.at(b, i, s.nq, h, c)] += ds * k[s.at(b, j, s.nk, h, c)] * dscale;
                        dk[s.at(b, j, s.nk, h, c)] += ds * q[s.at(b, i, s.nq, h, c)] * dscale;
                        dv[s.at(b, j, s.nk, h, c)] += p[j] * go[s.at(b, i, s.nq, h, c)];
                    }
                }
            }
    int failures = 0;
    auto compare = [&](const char* name, const std::vector<bf16_t>& got, const std::vector<double>& want) {
        double top = 0.1, worst = 0;
        for (double w : want) top = std::max(top, std::fabs(w));
        for (size_t i = 0; i < got.size(); i++) worst = std::max(worst, std::fabs(to_f32(got[i]) - want[i]));
        bool ok = worst < 3e-2 * top;
        std::printf("d%d nq %d nk %d%s %s: max abs error %.5f (scale %.3f) %s\n", s.d, s.nq, s.nk,
                    s.causal ? " causal" : "", name, worst, top, ok ? "ok" : "FAILED");
        failures += !ok;
    };
    compare("o", ob, o);
    compare("dq", dqb, dq);
    compare("dk", dkb, dk);
    compare("dv", dvb, dv);
    return failures;
}

int main() {
    int failures = 0;
    // Ragged last tiles, several blocks and key tiles, cross-attention over 77 keys.
    failures += run_case({1, 2, 64, 70, 77, false}, 1);
    failures += run_case({2, 1, 16, 130, 100, false}, 2);
    failures += run_case({1, 1, 64, 16, 5, false}, 3);
    // Causal self-attention over CLIP's 77 tokens (two key tiles, the second partial).
    failures += run_case({1, 2, 64, 77, 77, true}, 4);
    std::printf("%s\n", failures ? "FAILED" : "all cases within bf16 tolerance");
    return failures ? 1 : 0;
}

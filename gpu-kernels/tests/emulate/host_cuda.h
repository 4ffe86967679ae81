// The CUDA built-ins our kernels use, for host threads: a block's threads run as host threads
// that meet at barriers (`__syncthreads`), warps exchange values through slots (`__shfl_xor_sync`),
// and `launch` runs every block of a grid in turn. Enough to run the kernels of src/cuda/ on the
// CPU in tests (see kernel_emulation.rs); not a general CUDA emulator.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;

constexpr int MAX_WARPS = 8;
static std::unique_ptr<std::barrier<>> block_barrier;
static std::unique_ptr<std::barrier<>> warp_barrier[MAX_WARPS];

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)
#define __syncthreads() block_barrier->arrive_and_wait()
#define __expf expf

static inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
static inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline void __trap() { std::abort(); }
using std::min;

static float shuffle_slots[MAX_WARPS][32];
static inline float __shfl_xor_sync(unsigned, float v, int mask) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    shuffle_slots[w][l] = v;
    warp_barrier[w]->arrive_and_wait();
    float other = shuffle_slots[w][l ^ mask];
    warp_barrier[w]->arrive_and_wait();
    return other;
}

// Runs `kernel` for every block of a (blocks_x, blocks_y) grid of `threads`-thread blocks (a
// multiple of 32, at most 32 * MAX_WARPS), one block at a time.
template <typename F>
static void launch(int blocks_x, int blocks_y, int threads, F kernel) {
    blockDim.x = threads;
    gridDim.x = blocks_x;
    gridDim.y = blocks_y;
    for (int by = 0; by < blocks_y; by++) {
        for (int bx = 0; bx < blocks_x; bx++) {
            block_barrier = std::make_unique<std::barrier<>>(threads);
            for (auto& w : warp_barrier) w = std::make_unique<std::barrier<>>(32);
            std::vector<std::thread> pool;
            for (int t = 0; t < threads; t++) {
                pool.emplace_back([=] {
                    threadIdx.x = t;
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    kernel();
                });
            }
            for (auto& t : pool) t.join();
        }
    }
}

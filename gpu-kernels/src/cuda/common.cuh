// Shared by every kernel (prepended to each source before NVRTC compiles it): bf16 as raw bits,
// so no CUDA headers are needed at run time, and overloaded loads/stores so one template serves
// f32 and bf16 buffers.
typedef unsigned short bf16_t;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return __uint_as_float(((unsigned int)x) << 16); }

// Round to nearest even, NaN kept quiet: the same rounding as `half::bf16::from_f32` on the CPU.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ void put(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void put(bf16_t* p, long i, float v) { p[i] = f32_to_bf16(v); }

#define GRID_STRIDE(i, total) \
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (total); i += (long)gridDim.x * blockDim.x)

// -inf without math headers.
#define NEG_INF __int_as_float(0xff800000)

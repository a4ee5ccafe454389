// Lets g++ compile kernels/*.cu as plain C++ so tests can run the CUDA code path on the CPU.
//
// Every kernel is a grid-stride loop over rows with lanes striding over labels, so one
// "thread" with blockDim = gridDim = 1 covers the whole range sequentially. The round-to-nearest
// intrinsics become plain IEEE operations
// (build with -ffp-contract=off so none is fused into an FMA).
#pragma once
#include <math.h>

struct emu_dim3 {
    unsigned x, y, z;
};
static const emu_dim3 threadIdx = {0, 0, 0};
static const emu_dim3 blockIdx = {0, 0, 0};
static const emu_dim3 blockDim = {1, 1, 1};
static const emu_dim3 gridDim = {1, 1, 1};

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return sqrt(a); }
static inline float __double2float_rn(double a) { return (float)a; }
struct float4 {
    float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
// With blockDim.x == 1 no kernel reaches a shuffle; declared so the sources compile.
static inline float __shfl_xor_sync(unsigned, float value, int) { return value; }

// Lets g++ compile kernels/*.cu as plain C++ so tests can run the CUDA code path on the CPU
// (C++17, for the inline variables below).
//
// Every kernel is a grid-stride loop over rows with lanes striding over labels (or a block-stride
// loop over tiles), so a launch of one block of one row covers the whole range. By default that
// block has one lane (one "thread" walks everything). The tests can also run a block of L lanes
// as L host threads (emu_set_lanes, then emu_enter_lane(i) on each thread before calling the
// kernel): warp shuffles then exchange values between those threads at a barrier, as the lanes
// of a warp do, so the lane-group code (groups side by side, their shuffle trees) runs as on
// the GPU. The round-to-nearest intrinsics become plain IEEE operations (build with
// -ffp-contract=off so none is fused into an FMA).
#pragma once
#include <math.h>

#include <chrono>
#include <condition_variable>
#include <mutex>

struct emu_dim3 {
    unsigned x, y, z;
};
inline thread_local emu_dim3 threadIdx = {0, 0, 0};
inline emu_dim3 blockDim = {1, 1, 1};
static const emu_dim3 blockIdx = {0, 0, 0};
static const emu_dim3 gridDim = {1, 1, 1};

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// Block-wide kernels (gauss_stencil): shared memory is a function-local static array, which the
// host threads of one block share as a block's threads do; __syncthreads (below) is a barrier
// among them, and a block of one thread has nobody to wait for.
#define __shared__ static

static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return sqrt(a); }
static inline float __double2float_rn(double a) { return (float)a; }
// Aligned as CUDA's vector types (8 and 16 bytes), so a misaligned vector load, which faults on
// the GPU, is undefined here too: UBSan's alignment check (test_kernels_sanitized) reports it.
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) int2 {
    int x, y;
};
static inline int2 make_int2(int x, int y) { return int2{x, y}; }

// ---- lanes as host threads ------------------------------------------------------------------

inline std::mutex emu_mutex;
inline std::condition_variable emu_arrival;
inline int emu_waiting = 0;
inline unsigned long emu_round = 0;
inline float emu_slots[2][32];
inline int emu_failed = 0;
inline thread_local int emu_phase = 0;

// The block's lane count (1 to 32), before starting its threads.
extern "C" __attribute__((used)) inline void emu_set_lanes(int lanes) {
    blockDim.x = (unsigned)lanes;
    emu_waiting = 0;
    emu_failed = 0;
}

// On each lane's thread, before the kernel: this thread is lane `lane`.
extern "C" __attribute__((used)) inline void emu_enter_lane(int lane) {
    threadIdx.x = (unsigned)lane;
    emu_phase = 0;
}

// The block's row count (1 up to a kernel's block size), before starting its threads.
extern "C" __attribute__((used)) inline void emu_set_rows(int rows) {
    blockDim.y = (unsigned)rows;
    emu_waiting = 0;
    emu_failed = 0;
}

// On each row's thread, before the kernel: this thread is row `row` (threadIdx.y).
extern "C" __attribute__((used)) inline void emu_enter_row(int row) { threadIdx.y = (unsigned)row; }

// How many times the threads have met at a shuffle or barrier so far.
extern "C" __attribute__((used)) inline unsigned long emu_meetings() { return emu_round; }

// 1 when some thread waited 10 s at a shuffle or barrier for threads that never came.
extern "C" __attribute__((used)) inline int emu_shuffle_failed() { return emu_failed; }

// The calling thread (holding emu_mutex through `lock`) arrives; the last of `threads` to come
// releases them all, the others wait for it (and flag a failure after 10 s).
static inline void emu_meet(std::unique_lock<std::mutex>& lock, int threads) {
    const unsigned long round = emu_round;
    if (++emu_waiting == threads) {
        emu_waiting = 0;
        ++emu_round;
        emu_arrival.notify_all();
    } else if (!emu_arrival.wait_for(lock, std::chrono::seconds(10), [&] { return emu_round != round; })) {
        emu_failed = 1;
    }
}

// The block is one warp: blockDim.y rows of blockDim.x lanes, 32 threads at most, the warp
// lane of thread (x, y) being y * blockDim.x + x. Every lane deposits its value and waits for
// all the others (a warp shuffle's lockstep), then reads lane src_lane (modulo width) of its own
// segment of `width` lanes, as a warp's shuffle does. Two slot sets, alternated per shuffle, so
// a fast lane's next deposit cannot overwrite a value a slow lane has still to read.
static inline float __shfl_sync(unsigned, float value, int src_lane, int width = 32) {
    const int lanes = (int)(blockDim.x * blockDim.y), me = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    if (lanes == 1) return value;
    float* slot = emu_slots[emu_phase];
    emu_phase ^= 1;
    std::unique_lock<std::mutex> lock(emu_mutex);
    slot[me] = value;
    emu_meet(lock, lanes);
    const int segment = me / width * width;
    return slot[(segment + src_lane % width) % lanes];
}

// Every thread of the block waits here for all the others (blockDim.x * blockDim.y of them).
static inline void __syncthreads() {
    const int threads = (int)(blockDim.x * blockDim.y);
    if (threads == 1) return;
    std::unique_lock<std::mutex> lock(emu_mutex);
    emu_meet(lock, threads);
}

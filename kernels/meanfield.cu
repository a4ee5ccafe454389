// Mean-field pieces of the dense CRF around the lattice filter: unary from probabilities,
// softmax over labels, and the layout change back to (C, H, W) planes.
//
// Inside the CRF, per-pixel label vectors are rows of an (N, ld) float array (label-contiguous,
// pydensecrf's Q layout; ld >= C, rows padded to a multiple of 4 floats so the lattice kernels
// can move them as float4; pad columns are never read as labels), N being all pixels of the
// batch; callers hand in and get back one (C, H, W) plane stack per image. Grid-stride loops;
// no thread reads what another writes.

// Launch shape as in permutohedral.cu: blocks of (lanes, rows), rows in a grid-stride loop
// over blockIdx.x and threadIdx.y, lanes (threadIdx.x) over the labels of a row.
static __device__ __forceinline__ long long mf_grid_start() {
    return (long long)blockIdx.x * blockDim.y + threadIdx.y;
}

static __device__ __forceinline__ long long mf_grid_step() {
    return (long long)gridDim.x * blockDim.y;
}

// (c, p) of element t of a (C, n) array: 32-bit division when the array allows (much cheaper).
static __device__ __forceinline__ void mf_split(long long t, long long n, long long total, long long* c,
                                                long long* p) {
    if (total <= 0xffffffffLL) {
        const unsigned q = (unsigned)t / (unsigned)n;
        *c = q;
        *p = (long long)((unsigned)t - q * (unsigned)n);
    } else {
        *c = t / n;
        *p = t - *c * n;
    }
}

// One thread: one (label, pixel) element of one image's (C, n) probabilities, in that order so
// reads are coalesced. Reads probs[c * n + p]; writes the negated unary
// log(clip(p, clip_lo, 1)) to neg_unary[(pixel0 + p) * ld + c].
extern "C" __global__ void mf_unary(const float* probs, long long n, int n_labels, long long pixel0, float clip_lo,
                                    int ld, float* neg_unary) {
    const long long total = n * n_labels;
    for (long long t = mf_grid_start(); t < total; t += mf_grid_step()) {
        long long c, p;
        mf_split(t, n, total, &c, &p);
        const float x = fminf(fmaxf(probs[t], clip_lo), 1.0f);
        neg_unary[(pixel0 + p) * ld + c] = logf(x);
    }
}

// One warp (32 lanes along threadIdx.x): one pixel. Reads the C labels of its row
// in[p * ld ..] (an energy, here -U for Q0), lanes striding over labels; writes softmax of it to
// out's row (label columns only): subtract the max, exp, divide by the sum (pydensecrf's expAndNormalize). The max and
// sum are combined across lanes with a fixed xor-shuffle tree, so the result is deterministic.
// Launch with blockDim.x == 32 (or 1, where no shuffle runs). in and out must not alias.
extern "C" __global__ void mf_softmax(const float* in, long long n_pixels, int n_labels, int ld, float* out) {
    for (long long p = mf_grid_start(); p < n_pixels; p += mf_grid_step()) {
        const float* row = in + p * ld;
        float* dst = out + p * ld;
        float top = row[0];
        for (int c = threadIdx.x; c < n_labels; c += blockDim.x) top = fmaxf(top, row[c]);
        for (int lane = blockDim.x >> 1; lane > 0; lane >>= 1)
            top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, lane));
        float sum = 0.0f;
        for (int c = threadIdx.x; c < n_labels; c += blockDim.x) {
            const float e = expf(__fsub_rn(row[c], top));
            dst[c] = e;
            sum = __fadd_rn(sum, e);
        }
        for (int lane = blockDim.x >> 1; lane > 0; lane >>= 1)
            sum = __fadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, lane));
        for (int c = threadIdx.x; c < n_labels; c += blockDim.x) dst[c] = __fdiv_rn(dst[c], sum);
    }
}

// One thread: one (label, pixel) element of one image's (C, n) output, in that order so
// writes are coalesced. Reads q[(pixel0 + p) * ld + c]; writes out[c * n + p].
extern "C" __global__ void mf_to_planes(const float* q, long long n, int n_labels, long long pixel0, int ld,
                                        float* out) {
    const long long total = n * n_labels;
    for (long long t = mf_grid_start(); t < total; t += mf_grid_step()) {
        long long c, p;
        mf_split(t, n, total, &c, &p);
        out[t] = q[(pixel0 + p) * ld + c];
    }
}

// Largest finite float: the identity of the max below (every energy is finite).
#define MF_LOWEST (-3.402823466e+38f)

// One pixel's DP1 simplex corners on one lattice: vertex ids and barycentric weights.
template <int DP1>
static __device__ __forceinline__ void mf_load_corners(long long p, const int* vertex, const float* weight, int* vid,
                                                       float* w) {
#pragma unroll
    for (int r = 0; r < DP1; ++r) {
        vid[r] = vertex[p * DP1 + r];
        w[r] = weight[p * DP1 + r];
    }
}

// t plus one kernel's Potts message for label c: the slice alpha * sum_r w_r * values[v_r] in
// pydensecrf's order (seq: (w * v) * alpha; SSE path: (w * alpha) * v), times norm, times the
// kernel weight. The DP1 gathers are issued together, then summed in corner order.
template <int DP1>
static __device__ __forceinline__ float mf_add_message(float t, int c, int ld, int seq, const float* values,
                                                       const int* vid, const float* w, float norm, float alpha,
                                                       float weight) {
    float x[DP1];
#pragma unroll
    for (int r = 0; r < DP1; ++r) x[r] = values[(long long)vid[r] * ld + c];
    float acc = 0.0f;
#pragma unroll
    for (int r = 0; r < DP1; ++r)
        acc = __fadd_rn(acc, seq ? __fmul_rn(__fmul_rn(w[r], x[r]), alpha) : __fmul_rn(__fmul_rn(w[r], alpha), x[r]));
    return __fadd_rn(t, __fmul_rn(weight, __fmul_rn(acc, norm)));
}

// The end of one mean-field iteration, fused: slice the Gaussian (d = 2) and the bilateral
// (d = 5) lattice's blurred values, add the normalized Potts messages to -U in that order, and
// softmax over labels, so the energy never goes through memory. One warp (32 lanes along
// threadIdx.x): one pixel p, lanes striding over labels. Reads neg_unary's row p, the pixel's
// corners on each lattice, those vertices' value rows and the norms at p; writes Q's row p
// (first the energies, then their exponentials, then the quotients: each lane rereads only
// what it wrote). A kernel whose values pointer is null is left out. Max and sum combine
// across lanes with a fixed xor-shuffle tree, so the result is deterministic. Launch with
// blockDim.x == 32 (or 1).
extern "C" __global__ void mf_slice_softmax(const float* neg_unary, long long n_pixels, int n_labels, int ld, int seq,
                                            const float* values_g, const int* vertex_g, const float* weight_g,
                                            const float* norm_g, float alpha_g, float w_g,
                                            const float* values_b, const int* vertex_b, const float* weight_b,
                                            const float* norm_b, float alpha_b, float w_b, float* q) {
    for (long long p = mf_grid_start(); p < n_pixels; p += mf_grid_step()) {
        int vid_g[3], vid_b[6];
        float bary_g[3], bary_b[6], scale_g = 0.0f, scale_b = 0.0f;
        if (values_g) {
            mf_load_corners<3>(p, vertex_g, weight_g, vid_g, bary_g);
            scale_g = norm_g[p];
        }
        if (values_b) {
            mf_load_corners<6>(p, vertex_b, weight_b, vid_b, bary_b);
            scale_b = norm_b[p];
        }
        const float* row = neg_unary + p * ld;
        float* dst = q + p * ld;
        if (n_labels <= (int)blockDim.x) {
            // At most one label per lane (C <= 32): the energy stays in a register. The same
            // operations as the general path below, so the same bits.
            const int c = threadIdx.x;
            float t = MF_LOWEST;
            if (c < n_labels) {
                t = row[c];
                if (values_g)
                    t = mf_add_message<3>(t, c, ld, seq, values_g, vid_g, bary_g, scale_g, alpha_g, w_g);
                if (values_b)
                    t = mf_add_message<6>(t, c, ld, seq, values_b, vid_b, bary_b, scale_b, alpha_b, w_b);
            }
            float top = t;
            for (int lane = blockDim.x >> 1; lane > 0; lane >>= 1)
                top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, lane));
            const float e = c < n_labels ? expf(__fsub_rn(t, top)) : 0.0f;
            float sum = e;
            for (int lane = blockDim.x >> 1; lane > 0; lane >>= 1)
                sum = __fadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, lane));
            if (c < n_labels) dst[c] = __fdiv_rn(e, sum);
            continue;
        }
        float top = MF_LOWEST;
        for (int c = threadIdx.x; c < n_labels; c += blockDim.x) {
            float t = row[c];
            if (values_g) t = mf_add_message<3>(t, c, ld, seq, values_g, vid_g, bary_g, scale_g, alpha_g, w_g);
            if (values_b) t = mf_add_message<6>(t, c, ld, seq, values_b, vid_b, bary_b, scale_b, alpha_b, w_b);
            dst[c] = t;
            top = fmaxf(top, t);
        }
        for (int lane = blockDim.x >> 1; lane > 0; lane >>= 1)
            top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, lane));
        float sum = 0.0f;
        for (int c = threadIdx.x; c < n_labels; c += blockDim.x) {
            const float e = expf(__fsub_rn(dst[c], top));
            dst[c] = e;
            sum = __fadd_rn(sum, e);
        }
        for (int lane = blockDim.x >> 1; lane > 0; lane >>= 1)
            sum = __fadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, lane));
        for (int c = threadIdx.x; c < n_labels; c += blockDim.x) dst[c] = __fdiv_rn(dst[c], sum);
    }
}

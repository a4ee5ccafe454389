// Mean-field pieces of the dense CRF around the lattice filter: unary from probabilities, the
// fused slice + Potts + softmax that ends each iteration, and the layout change back to
// (C, H, W) planes.
//
// Inside the CRF, per-pixel label vectors are rows of an (N, ld) float array (label-contiguous,
// pydensecrf's Q layout), N being all pixels of the batch, ld = 4 * n_vec >= C: rows are padded
// to whole float4s, and the pad columns hold 0 in every array a kernel here writes. Callers hand
// in and get back one (C, H, W) plane stack per image. No thread reads what another writes.

// Launch shape as in permutohedral.cu: blocks of (lanes, rows), rows in a grid-stride loop
// over blockIdx.x and threadIdx.y, lanes (threadIdx.x) over the float4 chunks of a row.
static __device__ __forceinline__ long long mf_grid_start() {
    return (long long)blockIdx.x * blockDim.y + threadIdx.y;
}

static __device__ __forceinline__ long long mf_grid_step() {
    return (long long)gridDim.x * blockDim.y;
}

// One thread: one pixel p of one image's (C, n) probabilities. Reads probs[c * n + p] for every
// label c (coalesced across threads); writes the row pixel0 + p of neg_unary, whole float4s:
// log(clip(p, clip_lo, 1)) in the C label columns, 0 in the pad columns.
extern "C" __global__ void mf_unary_rows(const float* __restrict__ probs, long long n, int n_labels, long long pixel0,
                                         float clip_lo, int n_vec, float4* __restrict__ neg_unary) {
    for (long long p = mf_grid_start(); p < n; p += mf_grid_step()) {
        for (int j = 0; j < n_vec; ++j) {
            float v[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int c = 4 * j + k;
                v[k] = c < n_labels ? logf(fminf(fmaxf(probs[c * n + p], clip_lo), 1.0f)) : 0.0f;
            }
            neg_unary[(pixel0 + p) * n_vec + j] = make_float4(v[0], v[1], v[2], v[3]);
        }
    }
}

// One thread: one pixel p of one image's (C, n) output. Reads q's row pixel0 + p as float4s;
// writes out[c * n + p] for every label c (coalesced across threads).
extern "C" __global__ void mf_to_planes_rows(const float4* __restrict__ q, long long n, int n_labels,
                                             long long pixel0, int n_vec, float* __restrict__ out) {
    for (long long p = mf_grid_start(); p < n; p += mf_grid_step()) {
        for (int j = 0; j < n_vec; ++j) {
            const float4 x = q[(pixel0 + p) * n_vec + j];
            const float v[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int k = 0; k < 4; ++k)
                if (4 * j + k < n_labels) out[(4 * j + k) * n + p] = v[k];
        }
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

// ---- the Gaussian kernel as a per-pixel stencil ----------------------------------------------
// The Gaussian lattice's filter (splat, blur along axes 0, 1, 2, slice) is a fixed linear map of
// the pixels' label rows that links only pixels less than 4 sigma apart. So with the norms, alpha
// and the Potts weight folded in, pixel p's Gaussian message is sum_s stencil[s, p] * Q[q_s] over
// the pixels q_s of a (2R+1)^2 window around it: one gather of neighbouring Q rows in the slice
// kernel instead of a splat, three blur passes and a slice through lattice-sized arrays every
// iteration. The weights are built once per batch, with no sort and no vertex ids
// (permutohedral.cu gauss_corners, gauss_stencil_r<R>). The sums run in another order than
// pydensecrf's, so the result equals it up to float rounding, not bit for bit.

// The image of batch pixel p: the last b with image_start[b] <= p (binary search).
static __device__ __forceinline__ int mf_image_of(long long p, const long long* image_start, int n_images) {
    int lo = 0, hi = n_images - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (image_start[mid] <= p) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// ---- the fused slice + Potts + softmax: one lane group per pixel -------------------------------
// Launch shape: blocks of (G, rows) threads, G a power of two <= 32 (1 on the CPU), so a warp
// holds 32 / G rows, each on an aligned group of G lanes; lane j of a group handles the float4
// chunks j, j + G, ... of its row (labels 4j .. 4j+3). Rows are walked block by block with a
// bound every thread of a block shares, so all lanes of a warp reach each shuffle together (a
// row past the end computes nothing and stores nothing).

static __device__ __forceinline__ float mf_f4_get(const float4& a, int k) {
    return k == 0 ? a.x : k == 1 ? a.y : k == 2 ? a.z : a.w;
}

// t plus one kernel's Potts message for the 4 labels of chunk j, per label: the slice
// alpha * sum_r w_r * values[v_r] in pydensecrf's order (seq: (w * v) * alpha; SSE path:
// (w * alpha) * v), times norm, times the kernel weight. The DP1 row gathers are issued
// together, then summed in corner order.
template <int DP1>
static __device__ __forceinline__ float4 mf_add_message_v4(float4 t, int j, int n_vec, int seq,
                                                           const float4* __restrict__ values, const int* vid,
                                                           const float* w, float norm, float alpha, float weight) {
    float4 x[DP1];
#pragma unroll
    for (int r = 0; r < DP1; ++r) x[r] = values[(long long)vid[r] * n_vec + j];
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < DP1; ++r) {
        const float wa = __fmul_rn(w[r], alpha);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float xk = mf_f4_get(x[r], k);
            a[k] = __fadd_rn(a[k], seq ? __fmul_rn(__fmul_rn(w[r], xk), alpha) : __fmul_rn(wa, xk));
        }
    }
    return make_float4(__fadd_rn(t.x, __fmul_rn(weight, __fmul_rn(a[0], norm))),
                       __fadd_rn(t.y, __fmul_rn(weight, __fmul_rn(a[1], norm))),
                       __fadd_rn(t.z, __fmul_rn(weight, __fmul_rn(a[2], norm))),
                       __fadd_rn(t.w, __fmul_rn(weight, __fmul_rn(a[3], norm))));
}

// Stencil slots a lane loads at once: their weights, then the Q rows of the nonzero ones.
#define MF_STENCIL_GROUP 3

// t plus the Gaussian message of pixel p for the 4 labels of chunk j from its stencil weights:
// sum over the window's slots, row by row, of stencil[s, p] (slot-major, n_pixels a slot) times
// q_old's row of the slot's pixel (width: p's image's). Slots of weight 0 (off the image, or out
// of the blur's reach) read nothing and add nothing.
static __device__ __forceinline__ float4 mf_add_stencil_v4(float4 t, long long p, long long n_pixels, int j,
                                                           int n_vec, const float* __restrict__ stencil, int radius,
                                                           int width, const float4* __restrict__ q_old) {
    const int side = 2 * radius + 1;
    const float* row = stencil + p;  // slot 0 of pixel p
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int dy = -radius; dy <= radius; ++dy, row += side * n_pixels) {
        const long long left = p + (long long)dy * width - radius;  // the pixel of slot dx = -radius
        for (int k0 = 0; k0 < side; k0 += MF_STENCIL_GROUP) {
            float w[MF_STENCIL_GROUP];
            float4 x[MF_STENCIL_GROUP];
#pragma unroll
            for (int k = 0; k < MF_STENCIL_GROUP; ++k) w[k] = k0 + k < side ? row[(k0 + k) * n_pixels] : 0.0f;
#pragma unroll
            for (int k = 0; k < MF_STENCIL_GROUP; ++k)
                x[k] = w[k] != 0.0f ? q_old[(left + k0 + k) * n_vec + j] : zero;
#pragma unroll
            for (int k = 0; k < MF_STENCIL_GROUP; ++k) {
                if (w[k] == 0.0f) continue;
#pragma unroll
                for (int c = 0; c < 4; ++c) a[c] = __fadd_rn(a[c], __fmul_rn(w[k], mf_f4_get(x[k], c)));
            }
        }
    }
    return make_float4(__fadd_rn(t.x, a[0]), __fadd_rn(t.y, a[1]), __fadd_rn(t.z, a[2]), __fadd_rn(t.w, a[3]));
}

// The Gaussian stencil, when there is one: its weights ((2R+1)^2, n_pixels) and window radius,
// the width of the pixel's image (for the row step), and the Q the messages come from (the
// previous iteration's).
struct MfStencil {
    const float* weights;
    long long n_pixels;
    int radius, width;
    const float4* q_old;
};

// The energy chunk j of pixel p: -U plus the messages of the lattices whose values are given
// (with STENCIL, the Gaussian's from its stencil instead).
template <bool STENCIL>
static __device__ __forceinline__ float4 mf_energy_v4(long long p, int j, int n_vec, int seq,
                                                      const float4* __restrict__ neg_unary,
                                                      const float4* __restrict__ values_g, const int* vid_g,
                                                      const float* bary_g, float scale_g, float alpha_g, float w_g,
                                                      const MfStencil& st,
                                                      const float4* __restrict__ values_b, const int* vid_b,
                                                      const float* bary_b, float scale_b, float alpha_b, float w_b) {
    float4 t = neg_unary[p * n_vec + j];
    if (STENCIL) t = mf_add_stencil_v4(t, p, st.n_pixels, j, n_vec, st.weights, st.radius, st.width, st.q_old);
    else if (values_g) t = mf_add_message_v4<3>(t, j, n_vec, seq, values_g, vid_g, bary_g, scale_g, alpha_g, w_g);
    if (values_b) t = mf_add_message_v4<6>(t, j, n_vec, seq, values_b, vid_b, bary_b, scale_b, alpha_b, w_b);
    return t;
}

// Max and sum over one lane group (blockDim.x lanes) with a fixed xor-shuffle tree.
static __device__ __forceinline__ float mf_group_max(float v) {
    for (int lane = blockDim.x >> 1; lane > 0; lane >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, lane));
    return v;
}

static __device__ __forceinline__ float mf_group_sum(float v) {
    for (int lane = blockDim.x >> 1; lane > 0; lane >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, lane));
    return v;
}

// The end of one mean-field iteration, fused: slice the Gaussian (d = 2) and the bilateral
// (d = 5) lattice's blurred values, add the normalized Potts messages to -U in that order, and
// softmax over labels (pydensecrf's expAndNormalize), so the energy never goes through memory.
// One lane group (launch shape above): one pixel p. Reads neg_unary's row p, the pixel's corners
// on each given lattice, those vertices' value rows and the norms at p; writes Q's row p (pad
// columns 0). The max and the sum of exponentials go lane by lane (chunks in order, then
// components), then across the group by a fixed xor-shuffle tree: deterministic.
// With both values pointers null it is the softmax of neg_unary (Q0). When a row has more
// chunks than the group has lanes, the energies go through Q's row (each lane rereads only
// what it wrote). neg_unary and q must not alias.
// STENCIL (mf_slice_stencil_v4): the Gaussian message is gathered instead from its stencil weights
// (permutohedral.cu gauss_stencil, window radius `radius`) over q_old's rows of the pixels around p (image_start,
// image_width: the batch's images, for the row step); q_old must not alias q either. Its own
// kernel, so the plain one keeps its registers.
template <bool STENCIL>
static __device__ __forceinline__ void mf_slice_softmax(
    const float4* __restrict__ neg_unary, long long n_pixels, int n_labels, int n_vec, int seq,
    const float4* __restrict__ values_g, const int* __restrict__ vertex_g, const float* __restrict__ weight_g,
    const float* __restrict__ norm_g, float alpha_g, float w_g,
    const float* __restrict__ stencil, int radius, const float4* __restrict__ q_old,
    const long long* __restrict__ image_start, const int* __restrict__ image_width, int n_images,
    const float4* __restrict__ values_b, const int* __restrict__ vertex_b, const float* __restrict__ weight_b,
    const float* __restrict__ norm_b, float alpha_b, float w_b, float4* __restrict__ q) {
    const int lane = threadIdx.x, group = blockDim.x;
    for (long long base = (long long)blockIdx.x * blockDim.y; base < n_pixels; base += (long long)gridDim.x * blockDim.y) {
        const long long p = base + threadIdx.y;
        const bool live = p < n_pixels;
        int vid_g[3], vid_b[6];
        float bary_g[3], bary_b[6], scale_g = 0.0f, scale_b = 0.0f;
        if (!STENCIL && live && values_g) {
            mf_load_corners<3>(p, vertex_g, weight_g, vid_g, bary_g);
            scale_g = norm_g[p];
        }
        MfStencil st = {stencil, n_pixels, radius, 0, q_old};
        if (STENCIL && live) st.width = image_width[mf_image_of(p, image_start, n_images)];
        if (live && values_b) {
            mf_load_corners<6>(p, vertex_b, weight_b, vid_b, bary_b);
            scale_b = norm_b[p];
        }
        float top = MF_LOWEST;
        if (n_vec <= group) {
            // At most one chunk per lane (C <= 4 * group): the energies stay in registers.
            float t[4] = {MF_LOWEST, MF_LOWEST, MF_LOWEST, MF_LOWEST};
            const bool mine = live && lane < n_vec;
            if (mine) {
                const float4 e = mf_energy_v4<STENCIL>(p, lane, n_vec, seq, neg_unary, values_g, vid_g, bary_g, scale_g,
                                              alpha_g, w_g, st, values_b, vid_b, bary_b, scale_b, alpha_b, w_b);
                t[0] = e.x, t[1] = e.y, t[2] = e.z, t[3] = e.w;
            }
#pragma unroll
            for (int k = 0; k < 4; ++k)
                if (mine && 4 * lane + k < n_labels) top = fmaxf(top, t[k]);
            top = mf_group_max(top);
            float sum = 0.0f;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                t[k] = mine && 4 * lane + k < n_labels ? expf(__fsub_rn(t[k], top)) : 0.0f;
                sum = __fadd_rn(sum, t[k]);
            }
            sum = mf_group_sum(sum);
            if (mine)
                q[p * n_vec + lane] = make_float4(__fdiv_rn(t[0], sum), __fdiv_rn(t[1], sum), __fdiv_rn(t[2], sum),
                                                  __fdiv_rn(t[3], sum));
            continue;
        }
        if (live) {
            for (int j = lane; j < n_vec; j += group) {
                const float4 e = mf_energy_v4<STENCIL>(p, j, n_vec, seq, neg_unary, values_g, vid_g, bary_g, scale_g, alpha_g,
                                              w_g, st, values_b, vid_b, bary_b, scale_b, alpha_b, w_b);
                q[p * n_vec + j] = e;
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    if (4 * j + k < n_labels) top = fmaxf(top, mf_f4_get(e, k));
            }
        }
        top = mf_group_max(top);
        float sum = 0.0f;
        if (live) {
            for (int j = lane; j < n_vec; j += group) {
                const float4 e = q[p * n_vec + j];
                float x[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    x[k] = 4 * j + k < n_labels ? expf(__fsub_rn(mf_f4_get(e, k), top)) : 0.0f;
                    sum = __fadd_rn(sum, x[k]);
                }
                q[p * n_vec + j] = make_float4(x[0], x[1], x[2], x[3]);
            }
        }
        sum = mf_group_sum(sum);
        if (live) {
            for (int j = lane; j < n_vec; j += group) {
                const float4 e = q[p * n_vec + j];
                q[p * n_vec + j] = make_float4(__fdiv_rn(e.x, sum), __fdiv_rn(e.y, sum), __fdiv_rn(e.z, sum),
                                               __fdiv_rn(e.w, sum));
            }
        }
    }
}

// At most 256 threads a block (the launcher's), 64 registers: 4 blocks per multiprocessor, no spills.
extern "C" __global__ void __launch_bounds__(256, 4) mf_slice_softmax_v4(
    const float4* __restrict__ neg_unary, long long n_pixels, int n_labels, int n_vec, int seq,
    const float4* __restrict__ values_g, const int* __restrict__ vertex_g, const float* __restrict__ weight_g,
    const float* __restrict__ norm_g, float alpha_g, float w_g,
    const float4* __restrict__ values_b, const int* __restrict__ vertex_b, const float* __restrict__ weight_b,
    const float* __restrict__ norm_b, float alpha_b, float w_b, float4* __restrict__ q) {
    mf_slice_softmax<false>(neg_unary, n_pixels, n_labels, n_vec, seq, values_g, vertex_g, weight_g, norm_g, alpha_g,
                            w_g, nullptr, 0, nullptr, nullptr, nullptr, 0, values_b, vertex_b, weight_b, norm_b,
                            alpha_b, w_b, q);
}

extern "C" __global__ void __launch_bounds__(256, 4) mf_slice_stencil_v4(
    const float4* __restrict__ neg_unary, long long n_pixels, int n_labels, int n_vec, int seq,
    const float* __restrict__ stencil, int radius, const float4* __restrict__ q_old,
    const long long* __restrict__ image_start, const int* __restrict__ image_width, int n_images,
    const float4* __restrict__ values_b, const int* __restrict__ vertex_b, const float* __restrict__ weight_b,
    const float* __restrict__ norm_b, float alpha_b, float w_b, float4* __restrict__ q) {
    mf_slice_softmax<true>(neg_unary, n_pixels, n_labels, n_vec, seq, nullptr, nullptr, nullptr, nullptr, 0.0f, 0.0f,
                           stencil, radius, q_old, image_start, image_width, n_images, values_b, vertex_b, weight_b,
                           norm_b, alpha_b, w_b, q);
}

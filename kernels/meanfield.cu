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

// ---- the fused slice + Potts + softmax: one lane group per pixel -------------------------------
// Launch shape: blocks of (L, rows) threads, L = 32 (a warp a row of lanes) or a power of two
// (1 on the CPU). A pixel's lane group is G = min(n_vec, L) lanes, and a row of L lanes holds
// L / G groups side by side (5 of 6 lanes for 21 labels, the 2 lanes left over idle), so no
// lane of a group but the last of a row waits on chunks its pixel lacks. Lane j of a group
// handles the float4 chunks j, j + G, ... of its row (labels 4j .. 4j+3). Rows are walked block
// by block with a bound every thread of a block shares, so all lanes of a warp reach each
// shuffle together (a row past the end, or an idle lane, computes nothing and stores nothing).

// The calling lane's group in its row of blockDim.x lanes (launch shape above): `size` lanes
// (n_vec, or the whole row when a pixel has more chunks), the lane `lane` of the group whose
// first lane in the warp is `first` (a warp holds 32 / blockDim.x rows of lanes); `half`: half
// of size rounded up to a power of two (the shuffle trees' first step; 0 for one lane, no
// shuffles). A block takes `rows` = blockDim.y * (blockDim.x / size) rows
// (pixels or strips) a pass, row by row of lanes, group by group: the group's is `index` of
// them, -1 for a lane past its row's last group.
struct MfGroup {
    int size, lane, first, half, index, rows;
};

static __device__ __forceinline__ MfGroup mf_group(int n_vec) {
    MfGroup g;
    g.size = n_vec < (int)blockDim.x ? n_vec : (int)blockDim.x;
    const int per = (int)blockDim.x / g.size, slot = (int)threadIdx.x / g.size;
    g.lane = (int)threadIdx.x - slot * g.size;
    g.first = (int)((threadIdx.y * blockDim.x) & 31u) + slot * g.size;
    g.half = 0;
    if (g.size > 1)
        for (g.half = 1; 2 * g.half < g.size; g.half *= 2) {
        }
    g.rows = (int)blockDim.y * per;
    g.index = slot < per ? (int)threadIdx.y * per + slot : -1;
    return g;
}

// The row of the calling lane's group in the pass that starts at row `base`, or n (no row) for
// an idle lane; the passes start at blockIdx.x * g.rows and step by gridDim.x * g.rows.
static __device__ __forceinline__ long long mf_group_row(const MfGroup& g, long long base, long long n) {
    return g.index >= 0 ? base + g.index : n;
}

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

// t plus the bilateral lattice's message at pixel p (its corners and norm read here), when
// there is one (values_b not null).
static __device__ __forceinline__ float4 mf_add_bilateral_v4(float4 t, long long p, int j, int n_vec, int seq,
                                                             const float4* __restrict__ values_b,
                                                             const int* __restrict__ vertex_b,
                                                             const float* __restrict__ weight_b,
                                                             const float* __restrict__ norm_b, float alpha_b,
                                                             float w_b) {
    if (!values_b) return t;
    int vid[6];
    float bary[6];
    mf_load_corners<6>(p, vertex_b, weight_b, vid, bary);
    return mf_add_message_v4<6>(t, j, n_vec, seq, values_b, vid, bary, norm_b[p], alpha_b, w_b);
}

// Max (MAX) or sum over one lane group with a fixed xor tree over T lanes, T the group's size
// rounded up to a power of two, the T - size lanes it lacks holding the identity (as if the
// group had T lanes, the last idle): step `half` = T / 2 pairs lane l with l ^ half when that
// lane exists. After it lanes l and l ^ half hold the same value (the operation commutes), so
// the later steps pair lane l with (l mod half) ^ m, a lane of the group. Every lane of the
// group ends with the same value, the one the full T-lane tree gives: deterministic, and the
// same whatever the launch's lanes a row.
template <bool MAX>
static __device__ __forceinline__ float mf_group_reduce(float v, const MfGroup& g) {
    const int half = g.half;
    if (half == 0) return v;
    const int partner = g.lane ^ half;
    const bool has = partner < g.size;
    // (an idle lane's reads may run past the warp's last lane: they wrap around, and go unused)
    float o = __shfl_sync(0xffffffffu, v, g.first + (has ? partner : g.lane));
    if (has) v = MAX ? fmaxf(v, o) : __fadd_rn(v, o);
    const int low = g.lane & (half - 1);
    for (int m = half >> 1; m > 0; m >>= 1) {
        o = __shfl_sync(0xffffffffu, v, g.first + (low ^ m));
        v = MAX ? fmaxf(v, o) : __fadd_rn(v, o);
    }
    return v;
}

// The softmax of pixel p's energies when a row has at most one chunk per lane: lane g.lane
// holds chunk g.lane in t (`mine`: a chunk of a live pixel). The max and the sum of
// exponentials go lane by lane (components in order), then across the group by the fixed
// xor trees: deterministic. Every lane of the warp calls it; `mine` lanes store Q's chunk.
static __device__ __forceinline__ void mf_softmax_chunk(float* t, bool mine, const MfGroup& g, int n_labels,
                                                        long long p, int n_vec, float4* __restrict__ q) {
    const int lane = g.lane;
    float top = MF_LOWEST;
#pragma unroll
    for (int k = 0; k < 4; ++k)
        if (mine && 4 * lane + k < n_labels) top = fmaxf(top, t[k]);
    top = mf_group_reduce<true>(top, g);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        t[k] = mine && 4 * lane + k < n_labels ? expf(__fsub_rn(t[k], top)) : 0.0f;
        sum = __fadd_rn(sum, t[k]);
    }
    sum = mf_group_reduce<false>(sum, g);
    if (mine)
        q[p * n_vec + lane] = make_float4(__fdiv_rn(t[0], sum), __fdiv_rn(t[1], sum), __fdiv_rn(t[2], sum),
                                          __fdiv_rn(t[3], sum));
}

// The softmax of pixel p's energies when a row has more chunks than the group has lanes: the
// energies are already in Q's row (each lane wrote chunks lane, lane + G, ... and rereads only
// those), `top` the lane's max over them. Same order of operations as mf_softmax_chunk, chunk
// by chunk. Every lane of the warp calls it.
static __device__ __forceinline__ void mf_softmax_row(float top, bool live, const MfGroup& g, int n_labels,
                                                      long long p, int n_vec, float4* __restrict__ q) {
    const int lane = g.lane, group = g.size;
    top = mf_group_reduce<true>(top, g);
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
    sum = mf_group_reduce<false>(sum, g);
    if (live) {
        for (int j = lane; j < n_vec; j += group) {
            const float4 e = q[p * n_vec + j];
            q[p * n_vec + j] = make_float4(__fdiv_rn(e.x, sum), __fdiv_rn(e.y, sum), __fdiv_rn(e.z, sum),
                                           __fdiv_rn(e.w, sum));
        }
    }
}

// The max over the label columns of chunk j of e.
static __device__ __forceinline__ float mf_chunk_max(float top, const float4& e, int j, int n_labels) {
#pragma unroll
    for (int k = 0; k < 4; ++k)
        if (4 * j + k < n_labels) top = fmaxf(top, mf_f4_get(e, k));
    return top;
}

// The end of one mean-field iteration, fused: slice the Gaussian (d = 2) and the bilateral
// (d = 5) lattice's blurred values, add the normalized Potts messages to -U in that order, and
// softmax over labels (pydensecrf's expAndNormalize), so the energy never goes through memory.
// One lane group (launch shape above): one pixel p. Reads neg_unary's row p, the pixel's corners
// on each given lattice, those vertices' value rows and the norms at p; writes Q's row p (pad
// columns 0). With both values pointers null it is the softmax of neg_unary (Q0). When a row
// has more chunks than the group has lanes, the energies go through Q's row. neg_unary and q
// must not alias.
// At most 256 threads a block (the launcher's), 64 registers: 4 blocks per multiprocessor, no spills.
extern "C" __global__ void __launch_bounds__(256, 4) mf_slice_softmax_v4(
    const float4* __restrict__ neg_unary, long long n_pixels, int n_labels, int n_vec, int seq,
    const float4* __restrict__ values_g, const int* __restrict__ vertex_g, const float* __restrict__ weight_g,
    const float* __restrict__ norm_g, float alpha_g, float w_g,
    const float4* __restrict__ values_b, const int* __restrict__ vertex_b, const float* __restrict__ weight_b,
    const float* __restrict__ norm_b, float alpha_b, float w_b, float4* __restrict__ q) {
    const MfGroup g = mf_group(n_vec);
    const int lane = g.lane, group = g.size;
    for (long long base = (long long)blockIdx.x * g.rows; base < n_pixels; base += (long long)gridDim.x * g.rows) {
        const long long p = mf_group_row(g, base, n_pixels);
        const bool live = p < n_pixels;
        int vid_g[3];
        float bary_g[3], scale_g = 0.0f;
        if (live && values_g) {
            mf_load_corners<3>(p, vertex_g, weight_g, vid_g, bary_g);
            scale_g = norm_g[p];
        }
        if (n_vec <= group) {  // the group has n_vec lanes: a chunk each
            float t[4] = {MF_LOWEST, MF_LOWEST, MF_LOWEST, MF_LOWEST};
            if (live) {
                float4 e = neg_unary[p * n_vec + lane];
                if (values_g)
                    e = mf_add_message_v4<3>(e, lane, n_vec, seq, values_g, vid_g, bary_g, scale_g, alpha_g, w_g);
                e = mf_add_bilateral_v4(e, p, lane, n_vec, seq, values_b, vertex_b, weight_b, norm_b, alpha_b, w_b);
                t[0] = e.x, t[1] = e.y, t[2] = e.z, t[3] = e.w;
            }
            mf_softmax_chunk(t, live, g, n_labels, p, n_vec, q);
            continue;
        }
        float top = MF_LOWEST;
        if (live) {
            for (int j = lane; j < n_vec; j += group) {
                float4 e = neg_unary[p * n_vec + j];
                if (values_g)
                    e = mf_add_message_v4<3>(e, j, n_vec, seq, values_g, vid_g, bary_g, scale_g, alpha_g, w_g);
                e = mf_add_bilateral_v4(e, p, j, n_vec, seq, values_b, vertex_b, weight_b, norm_b, alpha_b, w_b);
                q[p * n_vec + j] = e;
                top = mf_chunk_max(top, e, j, n_labels);
            }
        }
        mf_softmax_row(top, live, g, n_labels, p, n_vec, q);
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
// pydensecrf's (and fused: one rounding a term), so the result equals it up to float rounding,
// not bit for bit.
//
// A lane group takes a strip of STRIP pixels one above the other: their windows share all but
// STRIP - 1 of their rows, so each neighbour's Q chunk is loaded once for the strip ((2R + STRIP)
// (2R + 1) loads instead of STRIP (2R + 1)^2) and added, with each pixel's weight, into every
// pixel's sum. The weights lie as the strip reads them (permutohedral.cu stencil_index): for each
// row of the union window and column, the strip's STRIP weights side by side, 0 for a pixel
// whose window lacks the row (or which is past the image's last row), so the gather has no
// branches: a weight of 0 adds exactly nothing (Q's rows are finite). Q's buffers have zeroed
// guard rows before and after the batch's pixels for the windows that reach past it.

// The image of a batch row r: the last b with start[b] <= r (binary search).
static __device__ __forceinline__ int mf_image_of(long long r, const long long* start, int n_images) {
    int lo = 0, hi = n_images - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (start[mid] <= r) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// The STRIP weights at `at` (one vector load; `at` is a multiple of STRIP floats).
template <int STRIP>
static __device__ __forceinline__ void mf_load_strip(const float* __restrict__ at, float (&w)[STRIP]);

template <>
__device__ __forceinline__ void mf_load_strip<1>(const float* __restrict__ at, float (&w)[1]) {
    w[0] = *at;
}

template <>
__device__ __forceinline__ void mf_load_strip<2>(const float* __restrict__ at, float (&w)[2]) {
    const float2 v = *reinterpret_cast<const float2*>(at);
    w[0] = v.x, w[1] = v.y;
}

template <>
__device__ __forceinline__ void mf_load_strip<4>(const float* __restrict__ at, float (&w)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(at);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
}

// The Gaussian messages of strip `strip` (batch row; its first pixel p0, the others width apart)
// for the 4 labels of chunk j, into a[k] for its pixel k: for each row u of the union window,
// top to bottom, and each column, left to right, a[k] += weight * q_old's chunk of that
// neighbour. Each pixel's terms thus add in its window's row-major order. The radius is a
// template argument, so a window row's columns unroll into straight loads and multiply-adds.
template <int STRIP, int R>
static __device__ __forceinline__ void mf_stencil_strip_r(float (&a)[STRIP][4], long long strip, long long p0,
                                                          long long n_strips, int j, int n_vec,
                                                          const float* __restrict__ stencil, int width,
                                                          const float4* __restrict__ q_old) {
    constexpr int side = 2 * R + 1;
    const long long step = n_strips * STRIP;  // from one column's weights to the next (and on to the next row)
    const float* w_at = stencil + strip * STRIP;
    const float4* x_row = q_old + (p0 - (long long)R * width - R) * n_vec + j;  // union row 0, column 0
    for (int u = 0; u < 2 * R + STRIP; ++u, w_at += side * step, x_row += (long long)width * n_vec) {
#pragma unroll
        for (int c = 0; c < side; ++c) {
            float w[STRIP];
            mf_load_strip<STRIP>(w_at + c * step, w);
            const float4 x = x_row[c * n_vec];
#pragma unroll
            for (int k = 0; k < STRIP; ++k) {
                a[k][0] = __fmaf_rn(w[k], x.x, a[k][0]);
                a[k][1] = __fmaf_rn(w[k], x.y, a[k][1]);
                a[k][2] = __fmaf_rn(w[k], x.z, a[k][2]);
                a[k][3] = __fmaf_rn(w[k], x.w, a[k][3]);
            }
        }
    }
}

template <int STRIP>
static __device__ __forceinline__ void mf_stencil_strip_v4(float (&a)[STRIP][4], long long strip, long long p0,
                                                           long long n_strips, int j, int n_vec,
                                                           const float* __restrict__ stencil, int radius, int width,
                                                           const float4* __restrict__ q_old) {
#pragma unroll
    for (int k = 0; k < STRIP; ++k)
#pragma unroll
        for (int i = 0; i < 4; ++i) a[k][i] = 0.0f;
    switch (radius) {  // cuda.py STENCIL_RADIUS_MAX = 4
        case 0: mf_stencil_strip_r<STRIP, 0>(a, strip, p0, n_strips, j, n_vec, stencil, width, q_old); break;
        case 1: mf_stencil_strip_r<STRIP, 1>(a, strip, p0, n_strips, j, n_vec, stencil, width, q_old); break;
        case 2: mf_stencil_strip_r<STRIP, 2>(a, strip, p0, n_strips, j, n_vec, stencil, width, q_old); break;
        case 3: mf_stencil_strip_r<STRIP, 3>(a, strip, p0, n_strips, j, n_vec, stencil, width, q_old); break;
        default: mf_stencil_strip_r<STRIP, 4>(a, strip, p0, n_strips, j, n_vec, stencil, width, q_old); break;
    }
}

// The energy chunk j of pixel p: -U plus the Gaussian message a (from the stencil), then the
// bilateral lattice's.
static __device__ __forceinline__ float4 mf_stencil_energy_v4(const float* a, long long p, int j, int n_vec, int seq,
                                                              const float4* __restrict__ neg_unary,
                                                              const float4* __restrict__ values_b,
                                                              const int* __restrict__ vertex_b,
                                                              const float* __restrict__ weight_b,
                                                              const float* __restrict__ norm_b, float alpha_b,
                                                              float w_b) {
    const float4 u = neg_unary[p * n_vec + j];
    const float4 t =
        make_float4(__fadd_rn(u.x, a[0]), __fadd_rn(u.y, a[1]), __fadd_rn(u.z, a[2]), __fadd_rn(u.w, a[3]));
    return mf_add_bilateral_v4(t, p, j, n_vec, seq, values_b, vertex_b, weight_b, norm_b, alpha_b, w_b);
}

// The end of one mean-field iteration with the Gaussian as a stencil: as mf_slice_softmax_v4,
// with the Gaussian message gathered from the stencil weights (radius R; layout above) over
// q_old's rows of the pixels around each pixel. One lane group: one strip, batch row r, of STRIP
// pixels of one image one above the other (an image's last strips may hold fewer); an image of
// height h and width w has ceil(h / STRIP) * w strips, numbered row-major from strip_start[b], so
// neighbouring groups take neighbouring columns. image_start (n_images + 1 entries, the last the
// batch's pixel count): each image's first pixel; image_width: its width. q_old has zeroed rows
// (R + STRIP) * (widest image + 1) before and after the batch's; writes Q's rows of the strip's
// pixels into q, which must alias neither q_old nor neg_unary.
template <int STRIP>
static __device__ __forceinline__ void mf_slice_stencil(
    const float4* __restrict__ neg_unary, long long n_rows, int n_labels, int n_vec, int seq,
    const float* __restrict__ stencil, int radius, const float4* __restrict__ q_old,
    const long long* __restrict__ image_start, const long long* __restrict__ strip_start,
    const int* __restrict__ image_width, int n_images, const float4* __restrict__ values_b,
    const int* __restrict__ vertex_b, const float* __restrict__ weight_b, const float* __restrict__ norm_b,
    float alpha_b, float w_b, float4* __restrict__ q) {
    const MfGroup g = mf_group(n_vec);
    const int lane = g.lane, group = g.size;
    for (long long base = (long long)blockIdx.x * g.rows; base < n_rows; base += (long long)gridDim.x * g.rows) {
        const long long r = mf_group_row(g, base, n_rows);
        const bool row_live = r < n_rows;
        long long p0 = 0;
        int width = 0, rows = 0;  // the strip's pixels on the image
        if (row_live) {
            const int b = mf_image_of(r, strip_start, n_images);
            width = image_width[b];
            const long long y = (r - strip_start[b]) / width * STRIP, x = (r - strip_start[b]) % width;
            const long long height = (image_start[b + 1] - image_start[b]) / width;
            p0 = image_start[b] + y * width + x;
            rows = height - y < STRIP ? (int)(height - y) : STRIP;
        }
        float a[STRIP][4];
        if (n_vec <= group) {
            // the group has n_vec lanes, a chunk each: the energies stay in registers, pixel by pixel
            if (row_live) mf_stencil_strip_v4<STRIP>(a, r, p0, n_rows, lane, n_vec, stencil, radius, width, q_old);
#pragma unroll
            for (int k = 0; k < STRIP; ++k) {
                float t[4] = {MF_LOWEST, MF_LOWEST, MF_LOWEST, MF_LOWEST};
                const long long p = p0 + (long long)k * width;
                if (row_live && k < rows) {
                    const float4 e = mf_stencil_energy_v4(a[k], p, lane, n_vec, seq, neg_unary, values_b, vertex_b,
                                                          weight_b, norm_b, alpha_b, w_b);
                    t[0] = e.x, t[1] = e.y, t[2] = e.z, t[3] = e.w;
                }
                mf_softmax_chunk(t, row_live && k < rows, g, n_labels, p, n_vec, q);
            }
            continue;
        }
        // more chunks than lanes (over 128 labels): the energies go through Q's rows
        float top[STRIP];
#pragma unroll
        for (int k = 0; k < STRIP; ++k) top[k] = MF_LOWEST;
        if (row_live) {
            for (int j = lane; j < n_vec; j += group) {
                mf_stencil_strip_v4<STRIP>(a, r, p0, n_rows, j, n_vec, stencil, radius, width, q_old);
#pragma unroll
                for (int k = 0; k < STRIP; ++k) {
                    if (k >= rows) continue;
                    const long long p = p0 + (long long)k * width;
                    const float4 e = mf_stencil_energy_v4(a[k], p, j, n_vec, seq, neg_unary, values_b, vertex_b,
                                                          weight_b, norm_b, alpha_b, w_b);
                    q[p * n_vec + j] = e;
                    top[k] = mf_chunk_max(top[k], e, j, n_labels);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < STRIP; ++k)
            mf_softmax_row(top[k], k < rows, g, n_labels, p0 + (long long)k * width, n_vec, q);
    }
}

// One kernel per strip height: mf_slice_stencil_k<STRIP> (CudaCRF's stencil_strip), at most 256
// threads a block and BLOCKS blocks per multiprocessor (registers: 65536 / (256 BLOCKS) each).
// ptxas (sm_90): strips of 1 and 2 take 64 registers (4 blocks), a strip of 4, with 16 sums
// live, 80 (3 blocks); each spills some registers (under 100 bytes stored, a few hundred
// loaded, across all paths), none inside the gather's column loop.
#define MF_SLICE_STENCIL_KERNEL(STRIP, BLOCKS)                                                                      \
    extern "C" __global__ void __launch_bounds__(256, BLOCKS) mf_slice_stencil_k##STRIP(                             \
        const float4* __restrict__ neg_unary, long long n_rows, int n_labels, int n_vec, int seq,                   \
        const float* __restrict__ stencil, int radius, const float4* __restrict__ q_old,                            \
        const long long* __restrict__ image_start, const long long* __restrict__ strip_start,                       \
        const int* __restrict__ image_width, int n_images, const float4* __restrict__ values_b,                     \
        const int* __restrict__ vertex_b, const float* __restrict__ weight_b, const float* __restrict__ norm_b,      \
        float alpha_b, float w_b, float4* __restrict__ q) {                                                          \
        mf_slice_stencil<STRIP>(neg_unary, n_rows, n_labels, n_vec, seq, stencil, radius, q_old, image_start,        \
                                strip_start, image_width, n_images, values_b, vertex_b, weight_b, norm_b, alpha_b,  \
                                w_b, q);                                                                             \
    }

MF_SLICE_STENCIL_KERNEL(1, 4)
MF_SLICE_STENCIL_KERNEL(2, 4)
MF_SLICE_STENCIL_KERNEL(4, 3)

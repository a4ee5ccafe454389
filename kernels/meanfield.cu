// Mean-field pieces of the dense CRF around the lattice filter: unary from probabilities,
// softmax over labels, and the layout change back to (C, H, W) planes.
//
// Inside the CRF, per-pixel label vectors are rows of an (N, C) float array (label-contiguous,
// pydensecrf's Q layout), N being all pixels of the batch; callers hand in and get back one
// (C, H, W) plane stack per image. Grid-stride loops; no thread reads what another writes.

// Launch shape as in permutohedral.cu: blocks of (lanes, rows), rows in a grid-stride loop
// over blockIdx.x and threadIdx.y, lanes (threadIdx.x) over the labels of a row.
static __device__ __forceinline__ long long mf_grid_start() {
    return (long long)blockIdx.x * blockDim.y + threadIdx.y;
}

static __device__ __forceinline__ long long mf_grid_step() {
    return (long long)gridDim.x * blockDim.y;
}

// One thread: one (label, pixel) element of one image's (C, n) probabilities, in that order so
// reads are coalesced. Reads probs[c * n + p]; writes the negated unary
// log(clip(p, clip_lo, 1)) to neg_unary[(pixel0 + p) * C + c].
extern "C" __global__ void mf_unary(const float* probs, long long n, int n_labels, long long pixel0, float clip_lo,
                                    float* neg_unary) {
    const long long total = n * n_labels;
    for (long long t = mf_grid_start(); t < total; t += mf_grid_step()) {
        const long long c = t / n;
        const long long p = t - c * n;
        const float x = fminf(fmaxf(probs[t], clip_lo), 1.0f);
        neg_unary[(pixel0 + p) * n_labels + c] = logf(x);
    }
}

// One warp (32 lanes along threadIdx.x): one pixel. Reads its row in[p * C .. p * C + C) (the
// mean-field energy -U + messages), lanes striding over labels; writes softmax of it to out's
// row: subtract the max, exp, divide by the sum (pydensecrf's expAndNormalize). The max and
// sum are combined across lanes with a fixed xor-shuffle tree, so the result is deterministic.
// Launch with blockDim.x == 32 (or 1, where no shuffle runs). in and out must not alias.
extern "C" __global__ void mf_softmax(const float* in, long long n_pixels, int n_labels, float* out) {
    for (long long p = mf_grid_start(); p < n_pixels; p += mf_grid_step()) {
        const float* row = in + p * n_labels;
        float* dst = out + p * n_labels;
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
// writes are coalesced. Reads q[(pixel0 + p) * C + c]; writes out[c * n + p].
extern "C" __global__ void mf_to_planes(const float* q, long long n, int n_labels, long long pixel0, float* out) {
    const long long total = n * n_labels;
    for (long long t = mf_grid_start(); t < total; t += mf_grid_step()) {
        const long long c = t / n;
        const long long p = t - c * n;
        out[t] = q[(pixel0 + p) * n_labels + c];
    }
}

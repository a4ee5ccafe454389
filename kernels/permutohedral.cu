// Permutohedral lattices of the dense CRF: build (elevate, dedupe, neighbours), the norms
// (K 1 through each lattice) and the filter of label rows (splat, blur), for a whole batch of
// images and both pairwise kernels at once.
//
// The lattices must be the ones pydensecrf builds (REFERENCE §2), bit for bit: every float
// operation that decides lattice membership or a barycentric weight is written with an
// explicit round-to-nearest intrinsic, in pydensecrf's order, and the module is compiled with
// --fmad=false so no multiply-add is fused behind our back.
//
// Both lattices (L = 1 or 2: lattice 0 the Gaussian d = 2 when present, then the bilateral
// d = 5) live in shared arrays, so one launch serves both:
//   entries  e in [0, E0) are lattice 0's, e = slot * (d0+1) + corner; e in [E0, E) lattice 1's,
//            e = E0 + slot * (d1+1) + corner. A slot is a pixel of the batch, or past the N
//            pixels an image's padding origin (see lattice_elevate).
//   key      up to two 64-bit words packing (lattice, remainder, image, q_0 .. q_{d-1}; on the
//            bilateral lattice in spatial order q_0 and q_1 give way to the point's position
//            split into fine and tile fields, see pack_coords), where the lattice coordinate
//            k_i = q_i * (d+1) + remainder (all coords of a vertex share their remainder mod
//            d+1); a table per lattice holds, per field, (word, shift, bits, lo), so
//            the host chooses the fields' order (cuda.py pack_layout). The lattice field is the
//            most significant, so after sorting lattice 0's entries and vertices come first:
//            vertices [0, M0) are lattice 0's, [M0, M) lattice 1's.
//            When one word holds the fields above its low `slot_bits` bits, those bits carry the
//            entry's slot (a "slotted" key): the keys are then unique, one plain sort of them
//            in place gives the stable order (slot order within a vertex, pydensecrf's splat
//            order) with no argsort, and an entry is known from its key (lattice, slot and
//            remainder = corner). Else the host argsorts the keys (order: sorted position ->
//            entry) and slot_bits is 0.
//   values   (M, C) floats, label-contiguous, so the lanes of one vertex read one row.
// Launch shape: blocks of (lanes, rows); threadIdx.x walks the labels of one row (a vertex,
// run or pixel), threadIdx.y and blockIdx.x walk rows in a grid-stride loop, so any grid
// covers the whole range and consecutive threads touch consecutive floats of (rows, C) arrays
// with no index division. A kernel never depends on another thread of the same launch (no
// atomics, no shared memory): results are deterministic.

// The constant table (int32) the host uploads once per geometry: each lattice's key packing
// (4 ints per field: lattice, remainder, image, d coordinates, and on the bilateral lattice its
// spatial tile x and y), the bilateral position's (lo, shift) in x and y (pack_coords; shift
// -1 in key order), then as float32 bits the features' standard deviations and elevation
// scales. Offsets must match cuda.py.
#define CONST_PACK_G 0
#define CONST_PACK_B 20
#define CONST_TILE_B 60
#define CONST_STD_G 64
#define CONST_SCALE_G 66
#define CONST_STD_B 68
#define CONST_SCALE_B 73
// info[] the build writes for the host: a key fell outside its packing (a bug), vertex count M,
// first vertex of each lattice.
#define INFO_ERROR 0
#define INFO_VERTICES 1
#define INFO_FIRST 2

typedef unsigned long long u64;

static __device__ __forceinline__ long long grid_start() {
    return (long long)blockIdx.x * blockDim.y + threadIdx.y;
}

static __device__ __forceinline__ long long grid_step() {
    return (long long)gridDim.x * blockDim.y;
}

// Entries per splat run of a vertex with `len` entries: about sqrt(len), at least min_chunk,
// so both the run sums and the per-vertex sums of runs stay short. Integer-only, so the
// split (and with it the rounding) depends on nothing but the vertex itself.
static __device__ __forceinline__ int run_chunk(int len, int min_chunk) {
    int s = (int)sqrt((double)len);
    while ((long long)s * s < len) ++s;
    while (s > 1 && (long long)(s - 1) * (s - 1) >= len) --s;
    return s < min_chunk ? min_chunk : s;
}

// Store field `f` = value into the packed key words; false when it does not fit the field.
// (The word is picked by a select, not an index, so two-word keys stay in registers.)
static __device__ __forceinline__ bool pack_put(u64* words, const int* pack, int f, long long value) {
    const int word = pack[4 * f], shift = pack[4 * f + 1], bits = pack[4 * f + 2];
    const long long v = value - pack[4 * f + 3];
    if (v < 0 || v >= (1LL << bits)) return false;
    const u64 put = (u64)v << shift;
    words[0] |= word ? 0ULL : put;
    words[1] |= word ? put : 0ULL;
    return true;
}

static __device__ __forceinline__ long long pack_get(const u64* words, const int* pack, int f) {
    const int word = pack[4 * f], shift = pack[4 * f + 1], bits = pack[4 * f + 2];
    const u64 mask = bits >= 64 ? ~0ULL : ((1ULL << bits) - 1ULL);
    return (long long)(((word ? words[1] : words[0]) >> shift) & mask) + pack[4 * f + 3];
}

// Whether a lattice's key stores the point's position instead of q_0 and q_1 (pack_coords):
// the bilateral lattice in spatial order, whose tile constants give a shift >= 0.
static __device__ __forceinline__ bool spatial_key(const int* tile) {
    return tile && tile[1] >= 0;
}

// The coordinate fields of the point with coordinates k (remainder r): field 3 + i holds
// q_i = (k_i - r) / (d+1). With spatial_key(tile), fields 3 and 4 hold instead the low bits of
// its position X = q_0 - q_1 and Y = q_0 + q_1 - 2 q_2 (2 cf_x and 6 cf_y of a pixel's own
// elevated point, over d+1), counted from tile[0] and tile[2], and fields 3 + D and 4 + D the
// rest (the tile): X - tile[0] = tile x << tile[1] | fine x, likewise Y with tile[3]. The
// position and q_2 .. q_{D-1} give back q_0 = (X + Y + 2 q_2) / 2 and q_1 = q_0 - X
// (unpack_coords), so each point still has one key, and X, Y span far fewer values than q_0,
// q_1 (no colour in them). False when a field does not fit: no vertex lies there.
template <int D>
static __device__ __forceinline__ bool pack_coords(u64* words, const int* pack, const int* tile, const int* k,
                                                   int r) {
    long long q[D];
#pragma unroll
    for (int i = 0; i < D; ++i) q[i] = (k[i] - r) / (D + 1);  // exact: k = r mod D+1
    bool ok = true;
    int first = 0;
    if (D >= 3 && spatial_key(tile)) {
        const long long pos[2] = {q[0] - q[1] - tile[0], q[0] + q[1] - 2 * q[D >= 3 ? 2 : 0] - tile[2]};
#pragma unroll
        for (int t = 0; t < 2; ++t) {
            const int shift = tile[2 * t + 1];
            ok = ok && pos[t] >= 0 && pack_put(words, pack, 3 + t, pos[t] & ((1LL << shift) - 1)) &&
                 pack_put(words, pack, 3 + D + t, pos[t] >> shift);
        }
        first = 2;
    }
#pragma unroll
    for (int i = 0; i < D; ++i)
        if (i >= first) ok = ok && pack_put(words, pack, 3 + i, q[i]);
    return ok;
}

// The coordinates k of a key packed by pack_coords (remainder r).
template <int D>
static __device__ __forceinline__ void unpack_coords(const u64* words, const int* pack, const int* tile, int r,
                                                     int* k) {
    long long q[D];
#pragma unroll
    for (int i = 0; i < D; ++i) q[i] = pack_get(words, pack, 3 + i);
    if (D >= 3 && spatial_key(tile)) {
        const long long x = (pack_get(words, pack, 3 + D) << tile[1] | q[0]) + tile[0];
        const long long y = (pack_get(words, pack, 4 + D) << tile[3] | q[1]) + tile[2];
        q[0] = (x + y + 2 * q[D >= 3 ? 2 : 0]) / 2;  // exact: x + y = 2 (q_0 - q_2)
        q[1] = q[0] - x;
    }
#pragma unroll
    for (int i = 0; i < D; ++i) k[i] = (int)(q[i] * (D + 1) + r);
}

// The key words at sorted position s, its slot bits cleared: key_lo/hi[order[s]] after an
// argsort; with order null the keys are slotted and sorted in place (one word), key_lo[s].
static __device__ __forceinline__ void sorted_key(const long long* order, const u64* key_lo, const u64* key_hi,
                                                  long long s, int slot_bits, u64* words) {
    if (order) {
        const long long e = order[s];
        words[0] = key_lo[e];
        words[1] = key_hi ? key_hi[e] : 0ULL;
    } else {
        words[0] = key_lo[s] & ~((1ULL << slot_bits) - 1ULL);
        words[1] = 0ULL;
    }
}

static __device__ __forceinline__ bool same_sorted_key(const long long* order, const u64* key_lo,
                                                       const u64* key_hi, long long a, long long b, int slot_bits) {
    u64 ka[2], kb[2];
    sorted_key(order, key_lo, key_hi, a, slot_bits, ka);
    sorted_key(order, key_lo, key_hi, b, slot_bits, kb);
    return ka[0] == kb[0] && ka[1] == kb[1];
}

// The entry at sorted position s: order[s] after an argsort; else (slotted keys) lattice l's
// entry e_first_l + slot * (d_l + 1) + remainder, from the key. The lattice field lies alike in
// both tables; the remainder's width is the lattice's own (lattice 0 is the Gaussian when its
// d + 1, dp1_0, is 3).
static __device__ __forceinline__ long long sorted_entry(const long long* order, const u64* key_lo, long long s,
                                                         int slot_bits, const int* consts, long long e_split,
                                                         int dp1_0, int dp1_1) {
    if (order) return order[s];
    const u64 words[2] = {key_lo[s], 0ULL};
    const long long slot = (long long)(words[0] & ((1ULL << slot_bits) - 1ULL));
    const bool first = pack_get(words, consts + CONST_PACK_G, 0) == 0;
    const int* pack = first && dp1_0 == 3 ? consts + CONST_PACK_G : consts + CONST_PACK_B;
    const long long r = pack_get(words, pack, 1);
    return first ? slot * dp1_0 + r : e_split + slot * dp1_1 + r;
}

// One slot's simplex on a lattice of dimension D, pydensecrf's SSE path step by step: features
// f = coord / std; running-sum elevation; round to the nearest multiple of d+1 (half to even);
// rank by remainder (ties to the later index); the +-(d+1) correction; barycentric weights with
// b[0] += 1 + b[d+1]. Its corner r (remainder r) has coordinates simplex_corner(rem0, rank, r, k).
// `origin`: all-zero features (a padding origin).
template <int D>
static __device__ __forceinline__ void simplex_of(int x, int y, const unsigned char* rgb, bool origin,
                                                  const float* stds, const float* scale, float* rem0, int* rank,
                                                  float* bary) {
    float f[D];
    if (origin) {
#pragma unroll
        for (int k = 0; k < D; ++k) f[k] = 0.0f;
    } else {
        f[0] = __fdiv_rn((float)x, stds[0]);
        f[1] = __fdiv_rn((float)y, stds[1]);
#pragma unroll
        for (int k = 2; k < D; ++k) f[k] = __fdiv_rn((float)rgb[k - 2], stds[k]);
    }
    const float inv_dp1 = __fdiv_rn(1.0f, (float)(D + 1));

    float elevated[D + 1];
    float sm = 0.0f;
#pragma unroll
    for (int j = D; j > 0; --j) {
        const float cf = __fmul_rn(f[j - 1], scale[j - 1]);
        elevated[j] = __fsub_rn(sm, __fmul_rn((float)j, cf));
        sm = __fadd_rn(sm, cf);
    }
    elevated[0] = sm;

    const float dp1 = (float)(D + 1);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k <= D; ++k) {
        const float v = rintf(__fmul_rn(inv_dp1, elevated[k]));
        rem0[k] = __fmul_rn(v, dp1);
        sum = __fadd_rn(sum, v);
    }

#pragma unroll
    for (int k = 0; k <= D; ++k) rank[k] = 0;
#pragma unroll
    for (int a = 0; a < D; ++a) {
        const float da = __fsub_rn(elevated[a], rem0[a]);
#pragma unroll
        for (int b = a + 1; b <= D; ++b) {
            if (da < __fsub_rn(elevated[b], rem0[b])) rank[a]++;
            else rank[b]++;
        }
    }

    const int isum = (int)sum;  // a small integer, exact in float
#pragma unroll
    for (int k = 0; k <= D; ++k) {
        rank[k] += isum;
        if (rank[k] < 0) {
            rank[k] += D + 1;
            rem0[k] = __fadd_rn(rem0[k], dp1);
        } else if (rank[k] >= D + 1) {
            rank[k] -= D + 1;
            rem0[k] = __fsub_rn(rem0[k], dp1);
        }
    }

#pragma unroll
    for (int k = 0; k < D + 2; ++k) bary[k] = 0.0f;
    for (int k = 0; k <= D; ++k) {
        const float v = __fmul_rn(__fsub_rn(elevated[k], rem0[k]), inv_dp1);
        const int p = D - rank[k];
        bary[p] = __fadd_rn(bary[p], v);
        bary[p + 1] = __fsub_rn(bary[p + 1], v);
    }
    bary[0] = __fadd_rn(bary[0], __fadd_rn(1.0f, bary[D + 1]));
}

// Coordinate k of the simplex's corner r: the canonical simplex adds r to the coordinates ranked
// <= D - r and r - (D+1) to the rest, so every coordinate of corner r is r mod D+1.
template <int D>
static __device__ __forceinline__ int simplex_corner(const float* rem0, const int* rank, int r, int k) {
    return (int)rem0[k] + (rank[k] <= D - r ? r : r - (D + 1));
}

// Elevate one slot onto lattice `lattice` (dimension D, simplex_of) and write its d+1 simplex
// corners (packed keys and barycentric weights) at entries e0 .. e0 + D. `tile`: the bilateral
// tiles' constants (pack_coords), null on the Gaussian lattice; `tag`: the slot, or'ed into the
// low bits of slotted keys (else 0).
template <int D>
static __device__ void elevate_pixel(int x, int y, const unsigned char* rgb, bool origin, int image_index,
                                     int lattice, const float* stds, const float* scale, const int* pack,
                                     const int* tile, long long e0, u64 tag, u64* key_lo, u64* key_hi,
                                     float* weight, int* info) {
    float rem0[D + 1], bary[D + 2];
    int rank[D + 1];
    simplex_of<D>(x, y, rgb, origin, stds, scale, rem0, rank, bary);
    bool ok = true;
#pragma unroll
    for (int r = 0; r <= D; ++r) {
        u64 words[2] = {0ULL, 0ULL};
        ok &= pack_put(words, pack, 0, lattice);
        ok &= pack_put(words, pack, 1, r);
        ok &= pack_put(words, pack, 2, image_index);
        int key[D];
#pragma unroll
        for (int k = 0; k < D; ++k) key[k] = simplex_corner<D>(rem0, rank, r, k);
        ok &= pack_coords<D>(words, pack, tile, key, r);
        key_lo[e0 + r] = words[0] | tag;
        if (key_hi) key_hi[e0 + r] = words[1];
        weight[e0 + r] = bary[r];
    }
    if (!ok) info[INFO_ERROR] = 1;
}

// One thread: one pixel i of one image (grid-stride over H*W), elevated onto each lattice
// present (e_g / e_b: first entry of the Gaussian / bilateral lattice, -1 when absent). Reads
// the pixel's colour and the constant table; writes its keys (slotted when `slotted`) and
// barycentric weights at its slot pixel0 + i, and sets info[INFO_ERROR] when a key falls
// outside its packing.
// pydensecrf elevates points 4 at a time and fills the unused lanes of an image's last group
// (when H*W % 4 != 0) with all-zero features; their simplex corners become real lattice
// vertices that no pixel splats to or slices from, but the blur passes values through them.
// So when pad_slot >= 0 one more thread (i = H*W) elevates the origin, tagged with this image,
// into slot pad_slot (past all pixels of the batch).
extern "C" __global__ void lattice_elevate(const unsigned char* image, int height, int width, long long pixel0,
                                           int image_index, long long pad_slot, const int* consts, long long e_g,
                                           long long e_b, int slotted, u64* key_lo, u64* key_hi, float* weight,
                                           int* info) {
    const long long n = (long long)height * width, rows = pad_slot >= 0 ? n + 1 : n;
    const float* fconsts = reinterpret_cast<const float*>(consts);
    for (long long i = grid_start(); i < rows; i += grid_step()) {
        const bool origin = i == n;
        const long long slot = origin ? pad_slot : pixel0 + i;
        const int x = origin ? 0 : (int)(i % width), y = origin ? 0 : (int)(i / width);
        const unsigned char* rgb = origin ? nullptr : image + i * 3;
        const u64 tag = slotted ? (u64)slot : 0ULL;
        if (e_g >= 0)
            elevate_pixel<2>(x, y, rgb, origin, image_index, 0, fconsts + CONST_STD_G, fconsts + CONST_SCALE_G,
                             consts + CONST_PACK_G, nullptr, e_g + slot * 3, tag, key_lo, key_hi, weight, info);
        if (e_b >= 0)
            elevate_pixel<5>(x, y, rgb, origin, image_index, e_g >= 0 ? 1 : 0, fconsts + CONST_STD_B,
                             fconsts + CONST_SCALE_B, consts + CONST_PACK_B, consts + CONST_TILE_B, e_b + slot * 6,
                             tag, key_lo, key_hi, weight, info);
    }
}

// One thread: one position s of the sorted entries (order: sorted position -> entry, or null
// for slotted keys sorted in place, see sorted_key). Reads the keys at s and s-1; writes
// flags[s] = 1 where a new vertex starts.
extern "C" __global__ void lattice_mark(const long long* order, const u64* key_lo, const u64* key_hi,
                                        long long n_entries, int slot_bits, int* flags) {
    for (long long s = grid_start(); s < n_entries; s += grid_step())
        flags[s] = s == 0 || !same_sorted_key(order, key_lo, key_hi, s, s - 1, slot_bits) ? 1 : 0;
}

// One thread: one sorted position s; `count` is the inclusive scan of flags, so vertex
// v = count[s] - 1. Where a vertex starts, writes its first sorted position starts[v] = s and
// its key (slot bits cleared), and where its lattice differs from the previous vertex's (or
// s = 0), info[INFO_FIRST + lattice] = v; the last position writes starts[M] = E and
// info[INFO_VERTICES] = M. order and slot_bits: as lattice_mark's.
extern "C" __global__ void lattice_vertices(const int* flags, const int* count, const long long* order,
                                            const u64* key_lo, const u64* key_hi, long long n_entries, int slot_bits,
                                            const int* consts, int* starts, u64* unique_lo, u64* unique_hi,
                                            int* info) {
    const int* pack = consts + CONST_PACK_G;
    for (long long s = grid_start(); s < n_entries; s += grid_step()) {
        const int v = count[s] - 1;
        if (flags[s]) {
            u64 own[2], prev[2];
            sorted_key(order, key_lo, key_hi, s, slot_bits, own);
            starts[v] = (int)s;
            unique_lo[v] = own[0];
            if (key_hi) unique_hi[v] = own[1];
            const int lattice = (int)pack_get(own, pack, 0);
            if (s > 0) sorted_key(order, key_lo, key_hi, s - 1, slot_bits, prev);
            if (s == 0 || lattice != (int)pack_get(prev, pack, 0)) info[INFO_FIRST + lattice] = v;
        }
        if (s == n_entries - 1) {
            starts[v + 1] = (int)n_entries;
            info[INFO_VERTICES] = v + 1;
        }
    }
}

// One thread: one sorted position s. Reads the entry e there (sorted_entry: order[s], or from
// the slotted key), its vertex (count[s] - 1) and weight; writes entry_vertex[e] (each slot's
// corner -> vertex, for slicing), and at s the entry's pixel (-1 for the padding origins, slots
// >= n_pixels: nothing splats from them) and weight (for splatting). Entries below e_split are
// lattice 0's, d+1 = dp1_0 per slot; the rest lattice 1's. The sorted positions are a
// permutation of the entries: no two threads write the same place.
extern "C" __global__ void lattice_entries(const long long* order, const u64* key_lo, int slot_bits,
                                           const int* consts, const int* count, const float* weight,
                                           long long n_entries, long long e_split, int dp1_0, int dp1_1,
                                           long long n_pixels, int* entry_vertex, int* sorted_pixel,
                                           float* sorted_weight) {
    for (long long s = grid_start(); s < n_entries; s += grid_step()) {
        const long long e = sorted_entry(order, key_lo, s, slot_bits, consts, e_split, dp1_0, dp1_1);
        entry_vertex[e] = count[s] - 1;
        const long long p = e < e_split ? e / dp1_0 : (e - e_split) / dp1_1;
        sorted_pixel[s] = p < n_pixels ? (int)p : -1;
        sorted_weight[s] = weight[e];
    }
}

// Index of `want` among the M sorted unique keys, or -1.
static __device__ __forceinline__ int find_key(const u64* unique_lo, const u64* unique_hi, long long n,
                                               u64 want_lo, u64 want_hi) {
    long long lo = 0, hi = n;
    while (lo < hi) {
        const long long mid = (lo + hi) >> 1;
        const u64 mhi = unique_hi ? unique_hi[mid] : 0ULL;
        const bool less = mhi < want_hi || (mhi == want_hi && unique_lo[mid] < want_lo);
        if (less) lo = mid + 1;
        else hi = mid;
    }
    if (lo < n && unique_lo[lo] == want_lo && (!unique_hi || unique_hi[lo] == want_hi)) return (int)lo;
    return -1;
}

// Key of the point `coords` (d explicit coordinates, remainder r) of lattice `lattice` in image
// b (`tile` as elevate_pixel's); false when it lies outside the packed range (then it is no
// vertex of this lattice).
template <int D>
static __device__ __forceinline__ bool pack_point(const int* coords, int r, int lattice, long long b,
                                                  const int* pack, const int* tile, u64* words) {
    words[0] = 0ULL;
    words[1] = 0ULL;
    const bool ok = pack_put(words, pack, 0, lattice) && pack_put(words, pack, 1, r) && pack_put(words, pack, 2, b);
    return ok && pack_coords<D>(words, pack, tile, coords, r);
}

// Vertex v's two neighbours along each of its lattice's D+1 axes, written to
// nbr[((axis * n) + v) * 2 + 0..1] (-1 = missing).
template <int D>
static __device__ void neighbours_of(long long v, const u64* unique_lo, const u64* unique_hi, long long n,
                                     const int* pack, const int* tile, int* nbr) {
    u64 own[2] = {unique_lo[v], unique_hi ? unique_hi[v] : 0ULL};
    const int lattice = (int)pack_get(own, pack, 0);
    const int r = (int)pack_get(own, pack, 1);
    const long long b = pack_get(own, pack, 2);
    int key[D];
    unpack_coords<D>(own, pack, tile, r, key);
    const int r1 = (r + D) % (D + 1), r2 = (r + 1) % (D + 1);
    for (int j = 0; j <= D; ++j) {
        // n1 = key - 1 everywhere but key + d on axis j; n2 the opposite (pydensecrf's blur).
        int c1[D], c2[D];
#pragma unroll
        for (int k = 0; k < D; ++k) {
            c1[k] = key[k] - 1;
            c2[k] = key[k] + 1;
        }
        if (j < D) {
            c1[j] = key[j] + D;
            c2[j] = key[j] - D;
        }
        u64 w1[2], w2[2];
        const long long out = ((long long)j * n + v) * 2;
        nbr[out] = pack_point<D>(c1, r1, lattice, b, pack, tile, w1) ? find_key(unique_lo, unique_hi, n, w1[0], w1[1])
                                                                       : -1;
        nbr[out + 1] = pack_point<D>(c2, r2, lattice, b, pack, tile, w2)
                           ? find_key(unique_lo, unique_hi, n, w2[0], w2[1])
                           : -1;
    }
}

// One thread: one vertex v in [v_begin, M) of either lattice (vertices [0, first_1) are lattice
// 0's, which is the Gaussian when has_g). Reads its key and binary-searches the M sorted unique
// keys for its two neighbours along each of its lattice's d+1 axes; writes nbr (6, M, 2) rows
// (axis, v) for axes 0..d (-1 = missing).
extern "C" __global__ void lattice_neighbours(const u64* unique_lo, const u64* unique_hi, long long n_vertices,
                                              long long v_begin, long long first_1, int has_g, const int* consts,
                                              int* nbr) {
    for (long long v = v_begin + grid_start(); v < n_vertices; v += grid_step()) {
        if (has_g && v < first_1)
            neighbours_of<2>(v, unique_lo, unique_hi, n_vertices, consts + CONST_PACK_G, nullptr, nbr);
        else
            neighbours_of<5>(v, unique_lo, unique_hi, n_vertices, consts + CONST_PACK_B, consts + CONST_TILE_B, nbr);
    }
}

// One thread: one vertex v. Reads its entry range from starts; writes how many splat runs it
// is cut into at counts[v + 1] (and counts[0] = 0), so the inclusive scan of counts is each
// vertex's first run, and whether that is more than one at several[v].
extern "C" __global__ void lattice_run_counts(const int* starts, long long n_vertices, int min_chunk, int* counts,
                                              int* several) {
    for (long long v = grid_start(); v < n_vertices; v += grid_step()) {
        const int len = starts[v + 1] - starts[v], chunk = run_chunk(len, min_chunk);
        const int count = (len + chunk - 1) / chunk;
        counts[v + 1] = count;
        several[v] = count > 1;
        if (v == 0) counts[0] = 0;
    }
}

// One thread: one vertex v. Cuts its entry range [starts[v], starts[v+1]) into runs of
// run_chunk(len) entries and writes their first entries at run_bounds[run_offset[v] ..], and
// for each run its vertex when that is the vertex's only run, else -1, at run_vertex[..]; the
// last vertex also closes the list with run_bounds[run_offset[M]] = E. A vertex of several
// runs also writes its id at multi[multi_pos[v] - 1] (multi_pos: the inclusive count of such
// vertices up to v), so the reductions visit only those, in vertex order; the last vertex
// writes their count, *n_multi = multi_pos[M - 1]. Splatting then sums
// each run, and each vertex sums its runs, both in a fixed order: a balanced, deterministic
// segmented sum even when one vertex collects many thousands of pixels.
extern "C" __global__ void lattice_runs(const int* starts, const int* run_offset, const int* multi_pos,
                                        long long n_vertices, int min_chunk, int* run_bounds, int* run_vertex,
                                        int* multi, int* n_multi) {
    for (long long v = grid_start(); v < n_vertices; v += grid_step()) {
        const int first = run_offset[v], count = run_offset[v + 1] - first;
        const int chunk = run_chunk(starts[v + 1] - starts[v], min_chunk);
        for (int k = 0; k < count; ++k) {
            run_bounds[first + k] = starts[v] + k * chunk;
            run_vertex[first + k] = count == 1 ? (int)v : -1;
        }
        if (count > 1) multi[multi_pos[v] - 1] = (int)v;
        if (v == n_vertices - 1) {
            run_bounds[run_offset[v + 1]] = starts[v + 1];
            *n_multi = multi_pos[v];
        }
    }
}

// The vertices of several runs a reduction visits: *n_multi of them, at most n_multi_max.
static __device__ __forceinline__ long long multi_count(const int* n_multi, long long n_multi_max) {
    return *n_multi < n_multi_max ? *n_multi : n_multi_max;
}

// ---- the norms: K 1 through each lattice, one value per vertex ---------------------------------

// One thread: one run r of the sorted entries (*n_runs of them, at most n_runs_max). Reads the
// run's entries' pixels and weights; writes the sum of the weights of real pixels (splatting
// ones), in entry order, to values[v] when the run is all of vertex v = run_vertex[r] >= 0,
// else to partial[r] for norm_splat_reduce.
extern "C" __global__ void norm_splat(const int* run_bounds, const int* n_runs, long long n_runs_max,
                                      const int* sorted_pixel, const float* sorted_weight, const int* run_vertex,
                                      float* values, float* partial) {
    const long long runs = *n_runs < n_runs_max ? *n_runs : n_runs_max;
    for (long long r = grid_start(); r < runs; r += grid_step()) {
        float acc = 0.0f;
        for (int s = run_bounds[r]; s < run_bounds[r + 1]; ++s)
            if (sorted_pixel[s] >= 0) acc = __fadd_rn(acc, sorted_weight[s]);  // w * 1, exactly
        const int v = run_vertex[r];
        if (v >= 0) values[v] = acc;
        else partial[r] = acc;
    }
}

// One thread: one vertex v = multi[i] cut into several runs (one-run vertices were written by
// the splat). Reads the partial sums of its runs partial[run_offset[v] .. run_offset[v+1]);
// writes their ordered sum to values[v].
extern "C" __global__ void norm_splat_reduce(const float* partial, const int* run_offset, const int* multi,
                                             const int* n_multi, long long n_multi_max, float* values) {
    const long long count = multi_count(n_multi, n_multi_max);
    for (long long i = grid_start(); i < count; i += grid_step()) {
        const long long v = multi[i];
        float acc = 0.0f;
        for (int r = run_offset[v]; r < run_offset[v + 1]; ++r) acc = __fadd_rn(acc, partial[r]);
        values[v] = acc;
    }
}

// The blur update of one value: own + 0.5 * pair (seq: pydensecrf's scalar path, through double,
// which the norms always take; the label rows' blur_f4 below takes it for 1 or 2 labels).
static __device__ __forceinline__ float blur_one(float own, float pair, int seq) {
    return seq ? __double2float_rn(__dadd_rn((double)own, __dmul_rn(0.5, (double)pair)))
               : __fadd_rn(own, __fmul_rn(0.5f, pair));
}

// One blur pass of the norms at vertex u along the axis whose neighbour ids are nbr[u]:
// src[u] + 0.5 * (n1 + n2), a missing neighbour counting 0, rounded once through double as
// pydensecrf's scalar path (one value per vertex) does.
static __device__ __forceinline__ float norm_blur_at(const float* src, const int2* nbr, long long u) {
    const int2 pair = nbr[u];
    const float a = pair.x >= 0 ? src[pair.x] : 0.0f;
    const float b = pair.y >= 0 ? src[pair.y] : 0.0f;
    return blur_one(src[u], __fadd_rn(a, b), 1);
}

// One thread: one vertex v in [v0, v1) of one blur pass along one axis (Jacobi: src is never
// written). Reads its two neighbour ids nbr[v] and the three values; writes dst[v].
extern "C" __global__ void norm_blur(const float* src, float* dst, const int2* nbr, long long v0, long long v1) {
    for (long long v = v0 + grid_start(); v < v1; v += grid_step()) dst[v] = norm_blur_at(src, nbr, v);
}

// One thread: one vertex v in [v0, v1) of one launch of norm blur passes, as lattice_blur_pair
// takes them (same plan, same arguments): one pass along nbr_s below vb, two from vb on (along
// nbr_a, then nbr_b; one when nbr_b is null), the second combining pass a's results at v and
// at its axis-b neighbours, each worked out from src as norm_blur does: bit-identical to two
// launches of norm_blur. The build's norms take 3 launches instead of 6.
extern "C" __global__ void norm_blur_pair(const float* src, float* dst, const int2* nbr_s, const int2* nbr_a,
                                          const int2* nbr_b, long long v0, long long vb, long long v1) {
    for (long long v = v0 + grid_start(); v < v1; v += grid_step()) {
        const float own = norm_blur_at(src, v < vb ? nbr_s : nbr_a, v);
        if (v < vb || !nbr_b) {
            dst[v] = own;
            continue;
        }
        const int2 pair = nbr_b[v];
        const float a = pair.x >= 0 ? norm_blur_at(src, nbr_a, pair.x) : 0.0f;
        const float b = pair.y >= 0 ? norm_blur_at(src, nbr_a, pair.y) : 0.0f;
        dst[v] = blur_one(own, __fadd_rn(a, b), 1);
    }
}

// pydensecrf's norm factor from K 1 at a pixel: 1 / sqrt(raw + 1e-20) (symmetric) or
// 1 / (raw + 1e-20) (after), in double and rounded to float once.
static __device__ __forceinline__ float norm_factor(float raw, int symmetric) {
    const double total = __dadd_rn((double)raw, 1e-20);
    return __double2float_rn(__ddiv_rn(1.0, symmetric ? __dsqrt_rn(total) : total));
}

// The norm factor of pixel p on one lattice: slice raw = alpha * sum_r w_r * values[v_r] in
// pydensecrf's scalar order ((w * v) * alpha), then norm_factor.
template <int DP1>
static __device__ __forceinline__ float norm_of(long long p, const float* values, const int* vertex,
                                                const float* weight, float alpha, int symmetric) {
    float raw = 0.0f;
#pragma unroll
    for (int r = 0; r < DP1; ++r)
        raw = __fadd_rn(raw, __fmul_rn(__fmul_rn(weight[p * DP1 + r], values[vertex[p * DP1 + r]]), alpha));
    return norm_factor(raw, symmetric);
}

// One thread: one pixel p. Reads its corners (vertex ids, weights) on each lattice given
// (values non-null) and those vertices' blurred K 1 values; writes norm_g[p] and norm_b[p].
extern "C" __global__ void lattice_norms(long long n_pixels, int symmetric, const float* values_g,
                                         const int* vertex_g, const float* weight_g, float alpha_g, float* norm_g,
                                         const float* values_b, const int* vertex_b, const float* weight_b,
                                         float alpha_b, float* norm_b) {
    for (long long p = grid_start(); p < n_pixels; p += grid_step()) {
        if (values_g) norm_g[p] = norm_of<3>(p, values_g, vertex_g, weight_g, alpha_g, symmetric);
        if (values_b) norm_b[p] = norm_of<6>(p, values_b, vertex_b, weight_b, alpha_b, symmetric);
    }
}

// ---- filtering label rows, padded to ld = 4 * n_vec floats, as float4s -----------------------
// One thread: one float4 (4 consecutive labels) of one row, in the launch shape above with
// n_vec lanes per row. Each component goes through pydensecrf's SSE-path operations in its
// order; only the loads and stores are 16 bytes wide.

static __device__ __forceinline__ float4 f4_scale(float4 a, float s) {
    return make_float4(__fmul_rn(a.x, s), __fmul_rn(a.y, s), __fmul_rn(a.z, s), __fmul_rn(a.w, s));
}

// acc + w * x, per component
static __device__ __forceinline__ float4 f4_add_scaled(float4 acc, float w, float4 x) {
    return make_float4(__fadd_rn(acc.x, __fmul_rn(w, x.x)), __fadd_rn(acc.y, __fmul_rn(w, x.y)),
                       __fadd_rn(acc.z, __fmul_rn(w, x.z)), __fadd_rn(acc.w, __fmul_rn(w, x.w)));
}

static __device__ __forceinline__ float4 f4_add(float4 a, float4 b) {
    return make_float4(__fadd_rn(a.x, b.x), __fadd_rn(a.y, b.y), __fadd_rn(a.z, b.z), __fadd_rn(a.w, b.w));
}

// Entries a splat thread loads at once: 8 measured 1.5-3% faster than 4 at 1-4 MP on an H200
// (64 registers, no spills).
#define SPLAT_GROUP 8

// One thread: one float4 c of run r (both lattices' runs, *n_runs of them, at most n_runs_max).
// Reads in[p * n_vec + c] times the pixel's norm for each entry of the run (scale_0 for runs of
// lattice 0, which start before sorted entry e_split, scale_1 after; none when null); writes
// the sum, in entry order, to values[v * n_vec + c] when the run is all of vertex
// v = run_vertex[r] >= 0, else to partial[r * n_vec + c] for lattice_splat_reduce.
// SPLAT_GROUP entries are loaded at once (their pixel ids and weights, then their rows), then
// summed in entry order: a short run costs one round trip to memory per step.
// Entries with pixel -1 (the padding origins) hold a vertex but add nothing.
extern "C" __global__ void lattice_splat(const float4* __restrict__ in, const float* __restrict__ scale_0,
                                         const float* __restrict__ scale_1, long long e_split,
                                         const int* __restrict__ run_bounds, const int* n_runs,
                                         long long n_runs_max, int n_vec, const int* __restrict__ sorted_pixel,
                                         const float* __restrict__ sorted_weight, const int* __restrict__ run_vertex,
                                         float4* values, float4* partial) {
    const long long runs = *n_runs < n_runs_max ? *n_runs : n_runs_max;
    for (long long r = grid_start(); r < runs; r += grid_step()) {
        const int first = run_bounds[r], end = run_bounds[r + 1];
        const long long v = run_vertex[r];
        const float* in_scale = first < e_split ? scale_0 : scale_1;
        float4* out = v >= 0 ? values + v * n_vec : partial + r * n_vec;
        for (int c = threadIdx.x; c < n_vec; c += blockDim.x) {
            float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int s = first; s < end; s += SPLAT_GROUP) {
                int p[SPLAT_GROUP];
                float w[SPLAT_GROUP];
                float4 x[SPLAT_GROUP];
#pragma unroll
                for (int k = 0; k < SPLAT_GROUP; ++k) {
                    const bool in_run = s + k < end;
                    p[k] = in_run ? sorted_pixel[s + k] : -1;
                    w[k] = in_run ? sorted_weight[s + k] : 0.0f;
                }
#pragma unroll
                for (int k = 0; k < SPLAT_GROUP; ++k) {
                    x[k] = p[k] >= 0 ? in[(long long)p[k] * n_vec + c] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    if (in_scale && p[k] >= 0) x[k] = f4_scale(x[k], in_scale[p[k]]);
                }
#pragma unroll
                for (int k = 0; k < SPLAT_GROUP; ++k)
                    if (p[k] >= 0) acc = f4_add_scaled(acc, w[k], x[k]);
            }
            out[c] = acc;
        }
    }
}

// One thread: one float4 c of a vertex v = multi[i] cut into several runs (one-run vertices
// were written by the splat). Writes values[v * n_vec + c] = the ordered sum of the vertex's
// partial rows.
extern "C" __global__ void lattice_splat_reduce(const float4* partial, const int* run_offset, const int* multi,
                                                const int* n_multi, long long n_multi_max, int n_vec,
                                                float4* values) {
    const long long count = multi_count(n_multi, n_multi_max);
    for (long long i = grid_start(); i < count; i += grid_step()) {
        const long long v = multi[i];
        const int first = run_offset[v], end = run_offset[v + 1];
        for (int c = threadIdx.x; c < n_vec; c += blockDim.x) {
            float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int r = first; r < end; ++r) acc = f4_add(acc, partial[(long long)r * n_vec + c]);
            values[v * n_vec + c] = acc;
        }
    }
}

// The blur update of one float4: own + 0.5 * (n1 + n2), per component.
static __device__ __forceinline__ float4 blur_f4(float4 own, float4 n1, float4 n2, int seq) {
    return make_float4(blur_one(own.x, __fadd_rn(n1.x, n2.x), seq), blur_one(own.y, __fadd_rn(n1.y, n2.y), seq),
                       blur_one(own.z, __fadd_rn(n1.z, n2.z), seq), blur_one(own.w, __fadd_rn(n1.w, n2.w), seq));
}

// One pass of the blur at float4 c of vertex u, from src along the axis whose neighbour ids
// (n1, n2) are nbr[u]; a missing neighbour counts 0.
static __device__ __forceinline__ float4 blur_at(const float4* __restrict__ src, const int2* __restrict__ nbr,
                                                 long long u, int n_vec, int c, int seq) {
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const int2 pair = nbr[u];  // both neighbour ids in one 8-byte load
    const float4 n1 = pair.x >= 0 ? src[(long long)pair.x * n_vec + c] : zero;
    const float4 n2 = pair.y >= 0 ? src[(long long)pair.y * n_vec + c] : zero;
    return blur_f4(src[u * n_vec + c], n1, n2, seq);
}

// One thread: one float4 c of a vertex v in [v0, v1) (the lattices that have this axis) of one
// blur pass (Jacobi: src is never written): dst = src + 0.5 * (n1 + n2) along the axis of nbr.
// `seq` selects pydensecrf's scalar path (used for 1 or 2 labels) instead of its SSE path.
extern "C" __global__ void lattice_blur(const float4* __restrict__ src, float4* __restrict__ dst,
                                        const int2* __restrict__ nbr, long long v0, long long v1, int n_vec,
                                        int seq) {
    for (long long v = v0 + grid_start(); v < v1; v += grid_step())
        for (int c = threadIdx.x; c < n_vec; c += blockDim.x) dst[v * n_vec + c] = blur_at(src, nbr, v, n_vec, c, seq);
}

// One thread: one float4 c of a vertex v in [v0, v1) of one launch of blur passes: vertices
// before vb take one pass along the axis of nbr_s; vertices from vb on take two, along the
// axis of nbr_a and then that of nbr_b (one when nbr_b is null). For two, pass a's result at v
// and at v's two axis-b neighbours is worked out from src as lattice_blur does, then combined
// as the second pass would: bit-identical to two passes through memory, with one write of the
// values instead of two and the extra rows read mostly from L2. That pays where neighbours are
// sparse (the bilateral lattice); the dense Gaussian lattice takes its passes one at a time.
extern "C" __global__ void lattice_blur_pair(const float4* __restrict__ src, float4* __restrict__ dst,
                                             const int2* __restrict__ nbr_s, const int2* __restrict__ nbr_a,
                                             const int2* __restrict__ nbr_b, long long v0, long long vb,
                                             long long v1, int n_vec, int seq) {
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (long long v = v0 + grid_start(); v < v1; v += grid_step()) {
        const bool two = v >= vb && nbr_b;
        int n1 = -1, n2 = -1;
        if (two) {
            const int2 pair = nbr_b[v];
            n1 = pair.x;
            n2 = pair.y;
        }
        for (int c = threadIdx.x; c < n_vec; c += blockDim.x) {
            const float4 own = blur_at(src, v < vb ? nbr_s : nbr_a, v, n_vec, c, seq);
            if (!two) {
                dst[v * n_vec + c] = own;
                continue;
            }
            const float4 a = n1 >= 0 ? blur_at(src, nbr_a, n1, n_vec, c, seq) : zero;
            const float4 b = n2 >= 0 ? blur_at(src, nbr_a, n2, n_vec, c, seq) : zero;
            dst[v * n_vec + c] = blur_f4(own, a, b, seq);
        }
    }
}

// ---- the Gaussian lattice as a grid of cells -------------------------------------------------
// The Gaussian lattice (d = 2) depends on pixel positions only, so its vertices sit on a regular
// 2D grid of cells (q0, q1) (stored coordinates k_i = 3 q_i + r), up to three per cell (one per
// remainder r), and every blur neighbour lies in the vertex's own cell or one of the 8 around
// it. `grid` maps each cell of the box an image can reach, per image, to its vertex ids:
// grid[((image * span1 + q1) * span0 + q0) * 3 + r], -1 where there is no vertex (q relative to
// the box origin, the key packing's q_lo). With it, neighbours are found by indexing instead of
// binary search.

// The cell step (dq0, dq1) and remainder r2 of the neighbour, along axis j on side `side` (0: n1,
// 1: n2), of a remainder-r vertex: as in neighbours_of<2>, n1 moves every stored coordinate by -1
// but axis j's by +2 (axis 2 has no stored coordinate) with remainder r - 1, n2 the opposite
// with r + 1; then q_i moves by (r + step_i - r2) / 3, exact (r + step_i = r2 mod 3).
static __device__ __forceinline__ void gauss_step(int r, int j, int side, int* dq0, int* dq1, int* r2) {
    *r2 = side ? (r + 1) % 3 : (r + 2) % 3;
    const int step = side ? 1 : -1;
    const int d0 = j == 0 ? -2 * step : step, d1 = j == 1 ? -2 * step : step;
    *dq0 = (r + d0 - *r2) / 3;
    *dq1 = (r + d1 - *r2) / 3;
}

// The slot of cell (q0, q1) (relative to the box origin), remainder r, of image b in a box of
// span0 x span1 cells per image, 3 slots a cell; -1 outside the box.
static __device__ __forceinline__ long long gauss_slot(long long b, long long q0, long long q1, int r, int span0,
                                                       int span1) {
    if (q0 < 0 || q0 >= span0 || q1 < 0 || q1 >= span1) return -1;
    return ((b * span1 + q1) * span0 + q0) * 3 + r;
}

// A Gaussian vertex's key as (remainder, image, q0, q1), q relative to the grid's origin.
static __device__ __forceinline__ void gauss_cell_of(const u64* unique_lo, const u64* unique_hi, long long v,
                                                     const int* pack, int* r, long long* b, long long* q0,
                                                     long long* q1) {
    const u64 words[2] = {unique_lo[v], unique_hi ? unique_hi[v] : 0ULL};
    *r = (int)pack_get(words, pack, 1);
    *b = pack_get(words, pack, 2);
    *q0 = pack_get(words, pack, 3) - pack[4 * 3 + 3];
    *q1 = pack_get(words, pack, 4) - pack[4 * 4 + 3];
}

// One thread: one Gaussian vertex v < n_vertices (lattice 0). Reads its key; writes v into its
// cell's slot of `grid` (keys are unique: no two threads write one slot). The box comes from the
// same bounds as the key packing, so every key lies inside it; the check only guards memory.
extern "C" __global__ void gauss_grid(const u64* unique_lo, const u64* unique_hi, long long n_vertices,
                                      const int* consts, int span0, int span1, int* grid) {
    for (long long v = grid_start(); v < n_vertices; v += grid_step()) {
        int r;
        long long b, q0, q1;
        gauss_cell_of(unique_lo, unique_hi, v, consts + CONST_PACK_G, &r, &b, &q0, &q1);
        const long long slot = gauss_slot(b, q0, q1, r, span0, span1);
        if (slot >= 0) grid[slot] = (int)v;
    }
}

// One thread: one Gaussian vertex v < n_gauss. Reads its key and the grid slots of its two
// neighbours along each of the 3 axes; writes them as lattice_neighbours does, to
// nbr[((axis * n_vertices) + v) * 2 + side] (-1 = missing): the same ids its binary search finds.
extern "C" __global__ void gauss_neighbours(const u64* unique_lo, const u64* unique_hi, long long n_gauss,
                                            long long n_vertices, const int* consts, int span0, int span1,
                                            const int* grid, int* nbr) {
    for (long long v = grid_start(); v < n_gauss; v += grid_step()) {
        int r;
        long long b, q0, q1;
        gauss_cell_of(unique_lo, unique_hi, v, consts + CONST_PACK_G, &r, &b, &q0, &q1);
        for (int j = 0; j < 3; ++j) {
            for (int side = 0; side < 2; ++side) {
                int dq0, dq1, r2;
                gauss_step(r, j, side, &dq0, &dq1, &r2);
                const long long slot = gauss_slot(b, q0 + dq0, q1 + dq1, r2, span0, span1);
                nbr[((long long)j * n_vertices + v) * 2 + side] = slot >= 0 ? grid[slot] : -1;
            }
        }
    }
}

// ---- the Gaussian kernel as a per-pixel stencil, without a lattice ----------------------------
// For the Gaussian stencil (meanfield.cu mf_slice_stencil_v4) the d = 2 lattice needs no sort: its
// points are found by indexing the box of cells above, and a point is a vertex when some pixel
// has it as a corner. pydensecrf's padding origin (lattice_elevate) has pixel (0, 0)'s position,
// so on this lattice it adds no vertex. The weights link only pixels less than 4 sigma apart (a
// simplex corner lies less than one lattice spacing, sigma pixels, from its point, and the three
// blur passes move along three axes that sum to zero, at most two spacings in all), so each
// pixel's row covers a (2R+1)^2 window, R the largest integer below 4 sigma.

// The box of cells gauss_corners marks, and where it starts: q_k = (k_k - r) / 3 - lo_k.
struct GaussBox {
    int span0, span1, lo0, lo1;
};

// The slot of the lattice point with explicit coordinates (k0, k1) (remainder k0 mod 3) of
// image b in the box, or -1 outside it.
static __device__ __forceinline__ long long gauss_point_slot(const GaussBox& box, long long b, int k0, int k1) {
    const int r = ((k0 % 3) + 3) % 3;
    return gauss_slot(b, (k0 - r) / 3 - box.lo0, (k1 - r) / 3 - box.lo1, r, box.span0, box.span1);
}

// One thread: one pixel i of one image (grid-stride over H*W). Elevates it onto the Gaussian
// lattice (the constant table's d = 2 entries); writes its three corners' explicit coordinates
// (k_0, k_1) and barycentric weights at corner[(pixel0 + i) * 3 + r] and weight[..] (corner r
// has remainder r), and sets their cells' slots (gauss_point_slot) to 1; info[0] = 1 when a
// corner falls outside the box (a bug). Threads that share a corner write the same byte:
// deterministic.
extern "C" __global__ void gauss_corners(const unsigned char* image, int height, int width, long long pixel0,
                                         int image_index, const int* consts, int span0, int span1, int2* corner,
                                         float* weight, unsigned char* cells, int* info) {
    const long long n = (long long)height * width;
    const float* fconsts = reinterpret_cast<const float*>(consts);
    const int* pack = consts + CONST_PACK_G;
    const GaussBox box = {span0, span1, pack[4 * 3 + 3], pack[4 * 4 + 3]};
    for (long long i = grid_start(); i < n; i += grid_step()) {
        float rem0[3], bary[4];
        int rank[3];
        simplex_of<2>((int)(i % width), (int)(i / width), image + i * 3, false, fconsts + CONST_STD_G,
                      fconsts + CONST_SCALE_G, rem0, rank, bary);
        for (int r = 0; r < 3; ++r) {
            const int k0 = simplex_corner<2>(rem0, rank, r, 0), k1 = simplex_corner<2>(rem0, rank, r, 1);
            corner[(pixel0 + i) * 3 + r] = make_int2(k0, k1);
            weight[(pixel0 + i) * 3 + r] = bary[r];
            const long long slot = gauss_point_slot(box, image_index, k0, k1);
            if (slot >= 0) cells[slot] = 1;
            else info[0] = 1;
        }
    }
}

// Whether the Gaussian lattice point (k0, k1) of image b is a vertex: its cell slot is set.
static __device__ __forceinline__ bool gauss_is_vertex(const unsigned char* cells, const GaussBox& box, long long b,
                                                       int k0, int k1) {
    const long long slot = gauss_point_slot(box, b, k0, k1);
    return slot >= 0 && cells[slot] != 0;
}

// The blur's reach from a vertex v (the slice end) back to the vertices u whose splatted value
// reaches v: u = v + s2 e2 + s1 e1 + s0 e0 (s in {-1, 0, 1}; the axes' steps e0 = (2, -1),
// e1 = (-1, 2), e2 = (-1, -1) in explicit coordinates, neighbours_of<2>'s), through the vertices
// v + s2 e2 and v + s2 e2 + s1 e1, which must exist (the blur skips missing ones), each step
// halving. As e0 + e1 + e2 = 0, u - v = A e0 + B e1 with A = s0 - s2 and B = s1 - s2 in
// [-2, 2]: coef[(A + 2) * 5 + B + 2] sums the paths' factors (powers of two: exact).
static __device__ __forceinline__ void gauss_reach(const unsigned char* cells, const GaussBox& box, long long b,
                                                   int2 v, float* coef) {
    const int e[3][2] = {{2, -1}, {-1, 2}, {-1, -1}};
    for (int t = 0; t < 25; ++t) coef[t] = 0.0f;
    for (int s2 = -1; s2 <= 1; ++s2) {
        const int2 w2 = make_int2(v.x + s2 * e[2][0], v.y + s2 * e[2][1]);
        if (s2 && !gauss_is_vertex(cells, box, b, w2.x, w2.y)) continue;
        for (int s1 = -1; s1 <= 1; ++s1) {
            const int2 w1 = make_int2(w2.x + s1 * e[1][0], w2.y + s1 * e[1][1]);
            if (s1 && !gauss_is_vertex(cells, box, b, w1.x, w1.y)) continue;
            for (int s0 = -1; s0 <= 1; ++s0) {
                const float c = (s2 ? 0.5f : 1.0f) * (s1 ? 0.5f : 1.0f) * (s0 ? 0.5f : 1.0f);
                coef[(s0 - s2 + 2) * 5 + s1 - s2 + 2] += c;
            }
        }
    }
}

// Pixels a block of gauss_stencil takes at once (its launch's rows per block, cuda.py
// STENCIL_BLOCK_ROWS).
#define STENCIL_BLOCK_ROWS 128

// Where the stencil keeps weight (dy, dx) of pixel (y, x) of an image: the slice kernel
// (meanfield.cu mf_slice_stencil) takes strips of `strip` pixels one above the other, the image's
// strips numbered row-major from strip0 (ceil(height / strip) * width of them; n_strips in the
// batch), and for each row u of the strip's union window (2R + strip rows) and column, reads the
// strip's `strip` weights as one vector. So the array is (2R + strip, 2R + 1, n_strips, strip):
// the pixel's row of the strip is k = y % strip, and its window row dy is union row dy + R + k.
// Union rows a pixel's window does not cover hold 0. With strip 1 it is ((2R+1)^2, n_pixels),
// slot-major.
static __device__ __forceinline__ long long stencil_index(int radius, int strip, long long n_strips,
                                                         long long strip0, int width, int y, int x, int dy,
                                                         int dx) {
    const int k = y % strip, side = 2 * radius + 1;
    const long long s = strip0 + (long long)(y / strip) * width + x;
    return (((long long)(dy + radius + k) * side + dx + radius) * n_strips + s) * strip + k;
}

// One thread: one pixel i of one image (height x width, batch pixels from pixel0; the batch has
// n_pixels), in blocks of STENCIL_BLOCK_ROWS threads (rows, one lane each: the shared row is
// threadIdx.y's, so blockDim.x must be 1, as cuda.py launches it), for a window of radius R. Reads
// the pixel's three Gaussian corners (gauss_corners' corner, weight), works out the blur's reach
// from each (gauss_reach, through the cells), then for each pixel q of the window inside the
// image and each of q's corners u, adds w_p(v) * reach_v(u) * w_q(u) over the pixel's corners v.
// Sums into its row of the block's shared memory and writes norm[p] = norm_factor(alpha * the
// row's sum) (K 1 at p, as pydensecrf's norm); then with the block writes the rows into stencil
// at stencil_index (strips of `strip` pixels, the image's first strip0 of n_strips; the array
// zeroed beforehand), slot by slot, so neighbouring threads write neighbouring pixels. Slot
// (dy + R) * (2R+1) + dx + R is the pixel dx right and dy down; 0 where q is off the image or
// out of reach. gauss_stencil_scale then folds the norms and weight in. Terms add in a fixed
// order: deterministic.
template <int R>
static __device__ __forceinline__ void gauss_stencil(int height, int width, long long pixel0, int image_index,
                                                     int strip, long long strip0, long long n_strips,
                                                     const int2* corner, const float* weight,
                                                     const unsigned char* cells, const GaussBox& box, float alpha,
                                                     int symmetric, float* norm, float* stencil) {
    constexpr int side = 2 * R + 1, slots = side * side;
    __shared__ float rows[STENCIL_BLOCK_ROWS * slots];
    float* row = rows + threadIdx.y * slots;
    const long long n = (long long)height * width;
    for (long long base = (long long)blockIdx.x * blockDim.y; base < n; base += (long long)gridDim.x * blockDim.y) {
        const long long i = base + threadIdx.y, p = pixel0 + i;
        for (int s = 0; s < slots; ++s) row[s] = 0.0f;
        if (i < n) {
            const int py = (int)(i / width), px = (int)(i % width);
            int2 v[3];
            float w[3], coef[3][25];
            for (int r = 0; r < 3; ++r) {
                v[r] = corner[p * 3 + r];
                w[r] = weight[p * 3 + r];
                gauss_reach(cells, box, image_index, v[r], coef[r]);
            }
            for (int dy = -R; dy <= R; ++dy) {
                if (py + dy < 0 || py + dy >= height) continue;
                for (int dx = -R; dx <= R; ++dx) {
                    if (px + dx < 0 || px + dx >= width) continue;
                    const long long q = p + (long long)dy * width + dx;
                    float* slot = row + (dy + R) * side + dx + R;
                    for (int j = 0; j < 3; ++j) {
                        const int2 u = corner[q * 3 + j];
                        const float w_u = weight[q * 3 + j];
                        for (int r = 0; r < 3; ++r) {
                            const int x = u.x - v[r].x, y = u.y - v[r].y;  // x = y mod 3: exact thirds
                            const int a = (2 * x + y) / 3, c = (x + 2 * y) / 3;
                            if (a < -2 || a > 2 || c < -2 || c > 2) continue;
                            const float reach = coef[r][(a + 2) * 5 + c + 2];
                            if (reach != 0.0f) *slot = __fadd_rn(*slot, __fmul_rn(__fmul_rn(w[r], reach), w_u));
                        }
                    }
                }
            }
            float raw = 0.0f;
            for (int s = 0; s < slots; ++s) raw = __fadd_rn(raw, row[s]);
            norm[p] = norm_factor(__fmul_rn(raw, alpha), symmetric);
        }
        __syncthreads();
        // slot by slot, the block's pixels are consecutive in stencil: consecutive threads copy them
        const int live = n - base < (long long)blockDim.y ? (int)(n - base) : (int)blockDim.y;
        for (int k = threadIdx.y; k < live * slots; k += blockDim.y) {
            const long long pixel = base + k % live;
            const int s = k / live;
            stencil[stencil_index(R, strip, n_strips, strip0, width, (int)(pixel / width), (int)(pixel % width),
                                  s / side - R, s % side - R)] = rows[(k % live) * slots + s];
        }
        __syncthreads();
    }
}

// gauss_stencil_r0 .. gauss_stencil_r4: the window radius is a template argument, so each
// block's shared rows are as long as its slots need (radius 3, sigma 1: 25 KB a block).
#define GAUSS_STENCIL_KERNEL(R)                                                                                \
    extern "C" __global__ void __launch_bounds__(STENCIL_BLOCK_ROWS) gauss_stencil_r##R(                      \
        int height, int width, long long pixel0, int image_index, int strip, long long strip0,                 \
        long long n_strips, const int2* corner, const float* weight, const unsigned char* cells, int span0,    \
        int span1, int lo0, int lo1, float alpha, int symmetric, float* norm, float* stencil) {                \
        const GaussBox box = {span0, span1, lo0, lo1};                                                         \
        gauss_stencil<R>(height, width, pixel0, image_index, strip, strip0, n_strips, corner, weight, cells,   \
                         box, alpha, symmetric, norm, stencil);                                                \
    }
GAUSS_STENCIL_KERNEL(0)
GAUSS_STENCIL_KERNEL(1)
GAUSS_STENCIL_KERNEL(2)
GAUSS_STENCIL_KERNEL(3)
GAUSS_STENCIL_KERNEL(4)

// One thread: one pixel i of one image (as gauss_stencil's, the same strips). Multiplies each
// nonzero weight of its window (radius `radius`) by scale * norm[p] (scale: alpha times the
// kernel's weight) and, when symmetric, by norm[q] of the slot's pixel q (a nonzero slot is on
// the image).
extern "C" __global__ void gauss_stencil_scale(int height, int width, long long pixel0, int radius, int strip,
                                               long long strip0, long long n_strips, const float* norm,
                                               int symmetric, float scale, float* stencil) {
    const long long n = (long long)height * width;
    for (long long i = grid_start(); i < n; i += grid_step()) {
        const long long p = pixel0 + i;
        const int y = (int)(i / width), x = (int)(i % width);
        const float f = __fmul_rn(scale, norm[p]);
        for (int dy = -radius; dy <= radius; ++dy) {
            for (int dx = -radius; dx <= radius; ++dx) {
                float* w = stencil + stencil_index(radius, strip, n_strips, strip0, width, y, x, dy, dx);
                if (*w == 0.0f) continue;
                const long long q = p + (long long)dy * width + dx;
                *w = symmetric ? __fmul_rn(__fmul_rn(*w, f), norm[q]) : __fmul_rn(*w, f);
            }
        }
    }
}

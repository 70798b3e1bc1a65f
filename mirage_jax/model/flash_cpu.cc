// Fused softmax attention for XLA:CPU: the `flash_cpu` backend of mirage_jax/model/attention.py.
//
// Why: XLA:CPU runs the reference attention as separate passes that each write a
// [B, H, N, N] tensor (logits, max, exp, normalise, their backward), memory-bound at
// head_dim 32; PyTorch's CPU attention is one fused kernel. This one keeps a block of 64
// query rows' scores (64 x N floats) in cache per thread and never writes N x N values.
//
// Layout as the reference: q, k, v [B, N, H, D] float32, key mask [B, N] (false = not
// attended: its logit is the constant -1e30, so a fully masked row is uniform), key bias
// [B, N, H] added to the logits of attended keys, optionally RoPE's cos and sin [B, N, H,
// D/2] (q and k are then rotated here, and the backward also returns the frequencies'
// gradient per (batch, head), [B, H, D/2, 3]). The forward saves each row's max and
// 1 / sum (kept apart: -1e30 + log l rounds to -1e30). The backward recomputes the
// probabilities block by block (FlashAttention-2's: dP = dO V^T, dS = P (dP - rowsum(dO O))).
// Work items are (batch, head) pairs, run on XLA's intra-op thread pool and the caller.
// Portable C++ (GCC/Clang vector types), built with -O3 -march=native.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Micro-tile shapes per vector ISA (tuning, not requirements): VL floats per register,
// ACC accumulators for the [rows][D] products, SV vectors per score tile (SR x SV
// accumulators). AVX2 has 16 registers: a 4 x 3 score tile, 3 loaded vectors, 1 broadcast.
#if defined(__AVX512F__)
constexpr int VL = 16, ACC = 16, SV = 4;
#elif defined(__AVX__)
constexpr int VL = 8, ACC = 8, SV = 3;
#else
constexpr int VL = 4, ACC = 8, SV = 2;  // SSE, NEON
#endif
constexpr int BQ = 64;              // query rows per block
constexpr int SR = 4;               // query rows per score tile
constexpr int JC = SV * VL;         // key columns per score tile (keys are padded to it)
constexpr float MASKED = -1e30f;    // the reference's logit for a masked key

// exp(x) for the softmax, vectorisable: 2^n * p(f), x = (n + f) ln 2, |f| <= 1/2, degree-6
// Taylor (relative error ~2e-7); 0 below -87 (masked keys, the -inf padding columns).
inline float exp_(float x) {
  float t = std::max(x, -87.0f) * 1.44269504f;
  float n = std::floor(t + 0.5f);
  float f = t - n;
  float p = 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

// Runs f(i) for i in [0, n) on the caller and up to (pool threads - 1) helpers. Helpers
// share the state by shared_ptr: one that starts after the caller returned finds no item.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, f]() {
    for (int64_t i; (i = st->next.fetch_add(1)) < n;) {
      f(i);
      if (st->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == n; });
}

// Per-thread scratch, grown on demand and reused across calls.
float* scratch(int slot, size_t floats) {
  thread_local std::vector<float> bufs[8];
  if (bufs[slot].size() < floats) bufs[slot].resize(floats);
  return bufs[slot].data();
}

struct Dims {
  int64_t b, n, h, d;
};

// One work item, a (batch, head) pair, and its strided views: token n's row of q is
// q + base + n * ld, key j's bias is bias[key(j)], row i's saved statistics stat(i).
struct Head {
  int64_t item, b, hh, heads, n, np, ld, base;  // np: tokens padded to JC; ld: H * D
  Head(const Dims& g, int64_t i)
      : item(i), b(i / g.h), hh(i % g.h), heads(g.h), n(g.n), np((g.n + JC - 1) / JC * JC),
        ld(g.h * g.d), base(b * g.n * ld + hh * g.d) {}
  int64_t key(int64_t j) const { return (b * n + j) * heads + hh; }
  int64_t stat(int64_t i) const { return item * n + i; }
  int64_t angle(int64_t j) const { return key(j) * (ld / heads / 2); }  // into cos, sin
};

// RoPE inside the kernel: q and k are rotated as they are packed, so XLA never writes the
// rotated copies, and the backward turns their gradients back and sums the angle gradient
// into the frequencies'. cos, sin [B, N, H, D/2] (null: no rotation), pos [B, N, 3].
struct Rope {
  const float* cos;
  const float* sin;
  const float* pos;
};

// y = R x * scale for token j: y1 = x1 c - x2 s, y2 = x1 s + x2 c on the two halves (the
// reference's `rope`); x itself without tables.
template <int D>
void rotate(const float* x, const Rope& r, const Head& h, int64_t j, float scale, float* y) {
  constexpr int F = D / 2;
  if (!r.cos) {
    for (int d = 0; d < D; ++d) y[d] = x[d] * scale;
    return;
  }
  const float* c = r.cos + h.angle(j);
  const float* s = r.sin + h.angle(j);
  for (int f = 0; f < F; ++f) {
    y[f] = (x[f] * c[f] - x[F + f] * s[f]) * scale;
    y[F + f] = (x[f] * s[f] + x[F + f] * c[f]) * scale;
  }
}

// From dy = dL/dy (y = R x, given as y * yscale) in place: dL/dx = R^T dy, and the angle's
// gradient dy2 y1 - dy1 y2 times token j's position added into dfreq [D/2][3].
template <int D>
void unrotate(float* dy, const float* y, float yscale, const Rope& r, const Head& h, int64_t j,
              float* dfreq) {
  constexpr int F = D / 2;
  const float* c = r.cos + h.angle(j);
  const float* s = r.sin + h.angle(j);
  const float* pos = r.pos + (h.b * h.n + j) * 3;
  for (int f = 0; f < F; ++f) {
    const float d1 = dy[f], d2 = dy[F + f];
    const float da = (d2 * y[f] - d1 * y[F + f]) * yscale;
    for (int a = 0; a < 3; ++a) dfreq[f * 3 + a] += da * pos[a];
    dy[f] = d1 * c[f] + d2 * s[f];
    dy[F + f] = d2 * c[f] - d1 * s[f];
  }
}

// A vector of VL floats (GCC/Clang vector extension: portable, no intrinsics).
typedef float vec __attribute__((vector_size(4 * VL)));
inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// Keeps v in a register: without it GCC folds the loads of b into each FMA's memory operand,
// loading every b vector R times (load-bound: the AVX2 backward 1.36x, forward 1.12x slower).
inline void pin(vec& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// acc[r][v] += sum_k a[r * ar + k * ak] * b[k * bk + v * VL], k < K: the register-tiled
// product every matmul here is an instance of. R x V accumulators stay in registers with
// V loads of b and one broadcast of a per k (the tile shapes above fit the register file).
template <int R, int V>
inline void tile(const float* a, int64_t ar, int64_t ak, const float* b, int64_t bk, int64_t K,
                 vec (&acc)[R][V]) {
  for (int64_t k = 0; k < K; ++k) {
    vec bv[V];
    for (int v = 0; v < V; ++v) bv[v] = load(b + k * bk + v * VL);
    for (int v = 0; v < V; ++v) pin(bv[v]);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * ar + k * ak];
      for (int v = 0; v < V; ++v) acc[r][v] += x * bv[v];
    }
  }
}

// Tile of the [rows][D] products: V vectors of D per pass, R rows (a power of two: divides
// BQ and JC's power-of-two factor), R x V <= ACC, R >= 2 where D allows (one row would load
// V vectors per V FMAs: load-bound).
template <int D>
struct RowTile {
  static constexpr int V = D / VL < ACC / 2 ? D / VL : ACC / 2;
  static constexpr int R = [] {
    int r = 1;
    while (2 * r * V <= ACC && 2 * r <= BQ && JC % (2 * r) == 0) r *= 2;
    return r;
  }();
};

// S[BQ][np] = A[BQ][D] @ Bt[D][np]: the scores (A = scaled queries) or dP (A = dO).
template <int D>
void scores(const float* a, const float* bt, int64_t np, float* s) {
  for (int r0 = 0; r0 < BQ; r0 += SR)
    for (int64_t j0 = 0; j0 < np; j0 += JC) {
      vec acc[SR][SV] = {};
      tile<SR, SV>(a + r0 * D, D, 1, bt + j0, np, D, acc);
      for (int r = 0; r < SR; ++r)
        for (int v = 0; v < SV; ++v) store(s + (r0 + r) * np + j0 + v * VL, acc[r][v]);
    }
}

// out[r][:] = scale_r * sum_j P[r][j] B[j][:] for rows r < rows: P V and dS K. B rows are
// strided (row j at b + j * ldb), j < n.
template <int D>
void rows_times(const float* p, int64_t np, const float* b, int64_t ldb, int64_t n,
                int rows, const float* scale, float* out, int64_t ldo) {
  using T = RowTile<D>;
  for (int r0 = 0; r0 < rows; r0 += T::R)
    for (int d0 = 0; d0 < D; d0 += T::V * VL) {
      vec acc[T::R][T::V] = {};
      tile<T::R, T::V>(p + r0 * np, np, 1, b + d0, ldb, n, acc);
      for (int r = 0; r < T::R && r0 + r < rows; ++r)
        for (int v = 0; v < T::V; ++v)
          store(out + (r0 + r) * ldo + d0 + v * VL, acc[r][v] * scale[r0 + r]);
    }
}

// acc[j][:] += sum_i A[i][j] B[i][:] over the block's BQ rows: dV += P^T dO, dK += dS^T Q.
template <int D>
void cols_times(const float* a, int64_t np, const float* b, float* acc_out) {
  using T = RowTile<D>;
  for (int64_t j0 = 0; j0 < np; j0 += T::R)
    for (int d0 = 0; d0 < D; d0 += T::V * VL) {
      vec acc[T::R][T::V] = {};
      tile<T::R, T::V>(a + j0, 1, np, b + d0, D, BQ, acc);
      for (int c = 0; c < T::R; ++c)
        for (int v = 0; v < T::V; ++v) {
          float* o = acc_out + (j0 + c) * D + d0 + v * VL;
          store(o, load(o) + acc[c][v]);
        }
    }
}

// Bt[D][np] (zero-padded columns) from rows x + j * ldx.
template <int D>
void pack_transposed(const float* x, int64_t ldx, const Head& h, float* bt) {
  std::memset(bt, 0, sizeof(float) * D * h.np);
  for (int64_t j = 0; j < h.n; ++j)
    for (int d = 0; d < D; ++d) bt[d * h.np + j] = x[j * ldx + d];
}

// The head's keys, rotated, as rows [n][D].
template <int D>
void pack_keys(const float* k, const Rope& r, const Head& h, float* out) {
  for (int64_t j = 0; j < h.n; ++j) rotate<D>(k + j * h.ld, r, h, j, 1.0f, out + j * D);
}

// A[BQ][D] = rows i0.. of x, rotated (with tables) and times scale, zero past the last token.
template <int D>
void pack_rows(const float* x, const Rope& rope, const Head& h, int64_t i0, int rows,
               float scale, float* a) {
  std::memset(a, 0, sizeof(float) * BQ * D);
  for (int r = 0; r < rows; ++r) rotate<D>(x + (i0 + r) * h.ld, rope, h, i0 + r, scale, a + r * D);
}

// Per-key logit offset: keep[j] (1 attended, 0 masked or padding) and the added bias.
void key_terms(const bool* mask, const float* bias, const Head& h, float* keep, float* add) {
  for (int64_t j = 0; j < h.np; ++j) {
    const bool on = j < h.n && mask[h.b * h.n + j];
    keep[j] = on ? 1.0f : 0.0f;
    add[j] = on ? bias[h.key(j)] : 0.0f;
  }
}

// Logits of the block in place: attended keys s + bias, masked -1e30, padding -inf.
void mask_logits(float* s, int64_t np, int64_t n, const float* keep, const float* add) {
  for (int i = 0; i < BQ; ++i) {
    float* row = s + i * np;
    for (int64_t j = 0; j < np; ++j)
      row[j] = keep[j] != 0.0f ? row[j] + add[j] : (j < n ? MASKED : -INFINITY);
  }
}

Dims dims_of(ffi::AnyBuffer q) {
  auto s = q.dimensions();
  return {s[0], s[1], s[2], s[3]};
}

template <int D>
void forward(const Dims& g, const float* q, const float* k, const float* v, const bool* mask,
             const float* bias, const Rope& rope, float* o, float* rmax, float* rinv,
             ffi::ThreadPool& pool) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  parallel_for(pool, g.b * g.h, [&](int64_t item) {
    const Head h(g, item);
    const int64_t np = h.np, base = h.base;
    float* kt = scratch(0, 2 * D * np);
    float* kr = kt + D * np;
    float* qs = scratch(1, BQ * D);
    float* s = scratch(2, BQ * np);
    float* keep = scratch(3, 2 * np);
    float* add = keep + np;
    float inv[BQ];
    pack_keys<D>(k + base, rope, h, kr);
    pack_transposed<D>(kr, D, h, kt);
    key_terms(mask, bias, h, keep, add);
    for (int64_t i0 = 0; i0 < g.n; i0 += BQ) {
      const int rows = static_cast<int>(std::min<int64_t>(BQ, g.n - i0));
      pack_rows<D>(q + base, rope, h, i0, rows, scale, qs);
      scores<D>(qs, kt, np, s);
      mask_logits(s, np, g.n, keep, add);
      for (int r = 0; r < rows; ++r) {
        float* row = s + r * np;
        float mx[VL], sum[VL];
        for (int l = 0; l < VL; ++l) mx[l] = -INFINITY, sum[l] = 0.0f;
        for (int64_t j = 0; j < np; j += VL)
          for (int l = 0; l < VL; ++l) mx[l] = std::max(mx[l], row[j + l]);
        float m = *std::max_element(mx, mx + VL);
        for (int64_t j = 0; j < np; j += VL)
          for (int l = 0; l < VL; ++l) sum[l] += (row[j + l] = exp_(row[j + l] - m));
        float total = 0.0f;
        for (int l = 0; l < VL; ++l) total += sum[l];
        const int64_t stat = h.stat(i0 + r);
        rmax[stat] = m;
        rinv[stat] = inv[r] = 1.0f / total;
      }
      rows_times<D>(s, np, v + base, h.ld, g.n, rows, inv, o + base + i0 * h.ld, h.ld);
    }
  });
}

template <int D>
void backward(const Dims& g, const float* q, const float* k, const float* v, const bool* mask,
              const float* bias, const Rope& rope, const float* o, const float* rmax,
              const float* rinv, const float* dout, float* dq, float* dk, float* dv,
              float* dbias, float* dfreq, ffi::ThreadPool& pool) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  parallel_for(pool, g.b * g.h, [&](int64_t item) {
    const Head h(g, item);
    const int64_t np = h.np, base = h.base;
    float* kt = scratch(0, 3 * D * np);
    float* vt = kt + D * np;
    float* kr = vt + D * np;
    float* qs = scratch(1, 2 * BQ * D);
    float* dos = qs + BQ * D;
    float* p = scratch(2, 2 * BQ * np);
    float* ds = p + BQ * np;
    float* keep = scratch(3, 3 * np);
    float* add = keep + np;
    float* db = add + np;
    float* dkv = scratch(4, 2 * np * D);  // dK, dV accumulators [np][D]
    float* dka = dkv;
    float* dva = dkv + np * D;
    std::memset(dkv, 0, sizeof(float) * 2 * np * D);
    std::memset(db, 0, sizeof(float) * np);
    float ones[BQ];
    std::fill(ones, ones + BQ, scale);
    float df[D / 2 * 3] = {};  // this head's frequency gradient
    pack_keys<D>(k + base, rope, h, kr);
    pack_transposed<D>(kr, D, h, kt);
    pack_transposed<D>(v + base, h.ld, h, vt);
    key_terms(mask, bias, h, keep, add);
    for (int64_t i0 = 0; i0 < g.n; i0 += BQ) {
      const int rows = static_cast<int>(std::min<int64_t>(BQ, g.n - i0));
      pack_rows<D>(q + base, rope, h, i0, rows, scale, qs);
      pack_rows<D>(dout + base, Rope{}, h, i0, rows, 1.0f, dos);
      scores<D>(qs, kt, np, p);
      mask_logits(p, np, g.n, keep, add);
      scores<D>(dos, vt, np, ds);  // dP
      for (int r = 0; r < BQ; ++r) {
        float* pr = p + r * np;
        float* dsr = ds + r * np;
        if (r >= rows) {  // past the last token: no probability, no gradient
          std::memset(pr, 0, sizeof(float) * np);
          std::memset(dsr, 0, sizeof(float) * np);
          continue;
        }
        const int64_t stat = h.stat(i0 + r);
        const float m = rmax[stat], inv = rinv[stat];
        float delta = 0.0f;
        const float* orow = o + base + (i0 + r) * h.ld;
        for (int d = 0; d < D; ++d) delta += dos[r * D + d] * orow[d];
        for (int64_t j = 0; j < np; ++j) {
          pr[j] = exp_(pr[j] - m) * inv;
          dsr[j] = keep[j] * pr[j] * (dsr[j] - delta);
        }
        for (int64_t j = 0; j < np; ++j) db[j] += dsr[j];
      }
      cols_times<D>(p, np, dos, dva);
      cols_times<D>(ds, np, qs, dka);  // qs holds R q * scale: dK = scale dS^T R Q
      float* dqb = dq + base + i0 * h.ld;
      rows_times<D>(ds, np, kr, D, g.n, rows, ones, dqb, h.ld);
      if (rope.cos)
        for (int r = 0; r < rows; ++r)
          unrotate<D>(dqb + r * h.ld, qs + r * D, 1.0f / scale, rope, h, i0 + r, df);
    }
    for (int64_t j = 0; j < g.n; ++j) {
      if (rope.cos) unrotate<D>(dka + j * D, kr + j * D, 1.0f, rope, h, j, df);
      std::memcpy(dk + base + j * h.ld, dka + j * D, sizeof(float) * D);
      std::memcpy(dv + base + j * h.ld, dva + j * D, sizeof(float) * D);
      dbias[h.key(j)] = db[j];
    }
    if (rope.cos) std::memcpy(dfreq + item * (D / 2 * 3), df, sizeof df);  // [B, H, D/2, 3]
  });
}

// kernel(std::integral_constant<int, D>) for the head_dim d the kernels are built for.
template <typename F>
ffi::Error dispatch(int64_t d, F kernel) {
  switch (d) {
    case 16: kernel(std::integral_constant<int, 16>{}); break;
    case 32: kernel(std::integral_constant<int, 32>{}); break;
    case 64: kernel(std::integral_constant<int, 64>{}); break;
    case 128: kernel(std::integral_constant<int, 128>{}); break;
    default: return ffi::Error::InvalidArgument("flash_cpu: head_dim must be 16, 32, 64 or 128");
  }
  return ffi::Error::Success();
}

const float* f32(ffi::AnyBuffer x) { return reinterpret_cast<const float*>(x.untyped_data()); }
float* f32(ffi::Result<ffi::AnyBuffer> x) { return reinterpret_cast<float*>(x->untyped_data()); }

// The rotation's tables from the cos, sin (empty: none) and pos buffers.
Rope rope_of(ffi::AnyBuffer cos, ffi::AnyBuffer sin, const float* pos) {
  if (cos.element_count() == 0) return Rope{};
  return Rope{f32(cos), f32(sin), pos};
}

ffi::Error FlashFwd(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer mask, ffi::AnyBuffer bias, ffi::AnyBuffer cos,
                    ffi::AnyBuffer sin, ffi::Result<ffi::AnyBuffer> o,
                    ffi::Result<ffi::AnyBuffer> rmax, ffi::Result<ffi::AnyBuffer> rinv) {
  const Dims g = dims_of(q);
  const bool* m = reinterpret_cast<const bool*>(mask.untyped_data());
  const Rope r = rope_of(cos, sin, nullptr);
  return dispatch(g.d, [&](auto dim) {
    forward<decltype(dim)::value>(g, f32(q), f32(k), f32(v), m, f32(bias), r, f32(o),
                                  f32(rmax), f32(rinv), pool);
  });
}

ffi::Error FlashBwd(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer mask, ffi::AnyBuffer bias, ffi::AnyBuffer cos,
                    ffi::AnyBuffer sin, ffi::AnyBuffer pos, ffi::AnyBuffer o,
                    ffi::AnyBuffer rmax, ffi::AnyBuffer rinv, ffi::AnyBuffer dout,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dbias,
                    ffi::Result<ffi::AnyBuffer> dfreq) {
  const Dims g = dims_of(q);
  const bool* m = reinterpret_cast<const bool*>(mask.untyped_data());
  const Rope r = rope_of(cos, sin, f32(pos));
  return dispatch(g.d, [&](auto dim) {
    backward<decltype(dim)::value>(g, f32(q), f32(k), f32(v), m, f32(bias), r, f32(o),
                                   f32(rmax), f32(rinv), f32(dout), f32(dq), f32(dk), f32(dv),
                                   f32(dbias), f32(dfreq), pool);
  });
}

// `binding` followed by Args buffer arguments, then Rets (>= 1) buffer results. Bindings
// cannot be copied or moved, only extended, so it recurses on the temporaries. The handler
// macros below take it in parentheses: their arguments split at its comma.
template <int Args, int Rets, typename B>
auto buffers(B&& binding) {
  static_assert(Rets > 0);
  if constexpr (Args > 0)
    return buffers<Args - 1, Rets>(std::move(binding).template Arg<ffi::AnyBuffer>());
  else if constexpr (Rets > 1)
    return buffers<0, Rets - 1>(std::move(binding).template Ret<ffi::AnyBuffer>());
  else
    return std::move(binding).template Ret<ffi::AnyBuffer>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MirageFlashFwd, FlashFwd,  // q k v mask bias cos sin -> o rmax rinv
                              (buffers<7, 3>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MirageFlashBwd, FlashBwd,  // ... pos o rmax rinv dout -> ... dfreq
                              (buffers<12, 5>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())));

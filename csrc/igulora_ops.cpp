// CPU ops of igulora (ATen + OpenMP through at::parallel_for), registered as torch.ops.igulora.*.
//
//   score_update_(ig, ibar!, ubar!, score!, beta1, beta2, eps, mode) -> ()
//       One pass over memory per element: I = |ig|, Ibar <- b1 Ibar + (1-b1) I,
//       Ubar <- b2 Ubar + (1-b2) |I - Ibar|, score by mode (igulora.config.SCORES):
//       0 snr (Ibar+eps)/(Ubar+eps), 1 product Ibar*Ubar, 2 stable_magnitude Ibar^2/(Ibar+Ubar+eps).
//       Ibar, Ubar and score are written in place (no allocation); math in fp32 (fp64 for fp64
//       state).
//   triplet_scores(score_A, score_E, score_B) -> S
//       S_k = score_E[k] + (mean_j score_A[k, j] + mean_i score_B[i, k]).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <type_traits>

namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per parallel chunk

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check_state(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "igulora::score_update_: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "igulora::score_update_: ", name, " must be contiguous (it is updated in place)");
  TORCH_CHECK(t.sizes() == like.sizes(), "igulora::score_update_: ", name, " has shape ", t.sizes(),
              " but ig has shape ", like.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "igulora::score_update_: ", name, " must be floating point");
}

// The per-element loop, specialised on the score so the compiler vectorises a branch-free body.
template <int MODE, typename S, typename G>
void score_update_loop(const G* __restrict__ ig, S* __restrict__ ibar, S* __restrict__ ubar, S* __restrict__ score,
                       int64_t begin, int64_t end, double beta1, double beta2, double eps_) {
  using A = acc_t<S>;
  // 1 - beta is formed in double and rounded once, exactly as eager PyTorch does with its
  // Python-float scalars: fp32 results are then bitwise eager's too.
  const A b1 = beta1, b2 = beta2, c1 = 1.0 - beta1, c2 = 1.0 - beta2, eps = eps_;
  for (int64_t i = begin; i < end; ++i) {
    const A imp = std::abs(static_cast<A>(ig[i]));
    const A ib = b1 * static_cast<A>(ibar[i]) + c1 * imp;
    const A ub = b2 * static_cast<A>(ubar[i]) + c2 * std::abs(imp - ib);
    ibar[i] = static_cast<S>(ib);
    ubar[i] = static_cast<S>(ub);
    A value;
    if constexpr (MODE == 0)
      value = (ib + eps) / (ub + eps);
    else if constexpr (MODE == 1)
      value = ib * ub;
    else
      value = ib * ib / (ib + ub + eps);
    score[i] = static_cast<S>(value);
  }
}

template <typename S, typename G>
void score_update_kernel(const G* ig, S* ibar, S* ubar, S* score, int64_t n, double beta1, double beta2,
                         double eps, int64_t mode) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if (mode == 0)
      score_update_loop<0>(ig, ibar, ubar, score, begin, end, beta1, beta2, eps);
    else if (mode == 1)
      score_update_loop<1>(ig, ibar, ubar, score, begin, end, beta1, beta2, eps);
    else
      score_update_loop<2>(ig, ibar, ubar, score, begin, end, beta1, beta2, eps);
  });
}

void score_update_(const at::Tensor& ig_in, at::Tensor& ibar, at::Tensor& ubar, at::Tensor& score, double beta1,
                   double beta2, double eps, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "igulora::score_update_: mode must be 0 (snr), 1 (product) or 2 "
              "(stable_magnitude), got ", mode);
  TORCH_CHECK(ig_in.device().is_cpu(), "igulora::score_update_: ig must be a CPU tensor, got ", ig_in.device());
  check_state(ibar, "ibar", ig_in);
  check_state(ubar, "ubar", ig_in);
  check_state(score, "score", ig_in);
  TORCH_CHECK(ibar.scalar_type() == ubar.scalar_type() && ibar.scalar_type() == score.scalar_type(),
              "igulora::score_update_: ibar is ", ibar.scalar_type(), " but ubar is ", ubar.scalar_type(),
              " and score is ", score.scalar_type());
  const at::Tensor ig = ig_in.contiguous();
  const int64_t n = ibar.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ibar.scalar_type(), "score_update_state", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ig.scalar_type(), "score_update_ig", [&] {
      score_update_kernel<S, scalar_t>(ig.data_ptr<scalar_t>(), ibar.data_ptr<S>(), ubar.data_ptr<S>(),
                                       score.data_ptr<S>(), n, beta1, beta2, eps, mode);
    });
  });
}

at::Tensor triplet_scores(const at::Tensor& score_A_in, const at::Tensor& score_E_in, const at::Tensor& score_B_in) {
  TORCH_CHECK(score_A_in.dim() == 2 && score_E_in.dim() == 1 && score_B_in.dim() == 2,
              "igulora::triplet_scores: expected score_A (r, in), score_E (r), score_B (out, r); got ",
              score_A_in.sizes(), ", ", score_E_in.sizes(), ", ", score_B_in.sizes());
  const int64_t r = score_A_in.size(0), k = score_A_in.size(1), n = score_B_in.size(0);
  TORCH_CHECK(score_E_in.size(0) == r && score_B_in.size(1) == r, "igulora::triplet_scores: rank mismatch: score_A ",
              score_A_in.sizes(), ", score_E ", score_E_in.sizes(), ", score_B ", score_B_in.sizes());
  const auto dtype = score_A_in.scalar_type();
  TORCH_CHECK(score_E_in.scalar_type() == dtype && score_B_in.scalar_type() == dtype,
              "igulora::triplet_scores: score_A, score_E and score_B must share a dtype");
  const at::Tensor a = score_A_in.contiguous(), e = score_E_in.contiguous(), b = score_B_in.contiguous();
  at::Tensor out = at::empty({r}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "triplet_scores", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pe = e.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    // Column sums of B in one row-major sweep, then one row sum of A per rank.
    std::vector<A> col(r, A(0));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < r; ++j) col[j] += static_cast<A>(pb[i * r + j]);
    at::parallel_for(0, r, 1, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        A row = 0;
        for (int64_t c = 0; c < k; ++c) row += static_cast<A>(pa[j * k + c]);
        const A mean_a = k ? row / k : A(NAN), mean_b = n ? col[j] / n : A(NAN);
        po[j] = static_cast<scalar_t>(static_cast<A>(pe[j]) + (mean_a + mean_b));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(igulora, m) {
  m.def("score_update_(Tensor ig, Tensor(a!) ibar, Tensor(b!) ubar, Tensor(c!) score, float beta1, float beta2, "
        "float eps, int mode) -> ()");
  m.def("triplet_scores(Tensor score_A, Tensor score_E, Tensor score_B) -> Tensor");
}

TORCH_LIBRARY_IMPL(igulora, CPU, m) {
  m.impl("score_update_", &score_update_);
  m.impl("triplet_scores", &triplet_scores);
}

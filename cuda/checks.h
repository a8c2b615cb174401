// The cuda backend's argument checks: the same errors as the cpu oracle, named after the op, for
// every tensor an op is given, and the aliasing rules of its outputs.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "kernels/kernels.h"
#include "opencamp/tensor.h"

namespace opencamp::cuda {

bool env_disables(const char* name);
[[noreturn]] void invalid(const char* op, const std::string& what);
void expect(bool ok, const char* op, const char* what);
void expect_device(const Tensor& t, const char* op, const char* name);
void expect_f32(const Tensor& t, int ndim, const char* op, const char* name);
ElementType element_type(DType dtype, const char* op);
bool same_view(const Tensor& a, const Tensor& b);
std::pair<uintptr_t, uintptr_t> byte_range(const Tensor& t);
bool overlaps(const Tensor& a, const Tensor& b);
bool disjoint(const Tensor& a, const Tensor& b);
bool rows_aligned(const Tensor& weight);

template <class T>
bool same_span(std::span<const T> a, std::span<const T> b) {
  return a.data() == b.data() && a.size() == b.size();
}

}  // namespace opencamp::cuda

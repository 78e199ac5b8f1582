// One signature per op, checked at compile time. Each op's C++ entry points are declared once,
// in csrc/common/<op>_api.h, by an op struct: the op's name, its C++ function type and the
// names of its arguments,
//   struct BitpackOp {
//     static constexpr const char* name = "bitpack";
//     using Fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x);
//     static constexpr std::array<const char*, 1> args{"x"};
//   };
//   BitpackOp::Fn bitpack_cpu, bitpack_cuda;  // the CPU and CUDA kernels, declared of type Fn
// (a trailing '!' on an argument name: the op writes that tensor, or list of tensors, in place).
// - csrc/register.cpp defines every op's schema from it: cbp::define<BitpackOp>(m) infers the
//   types from Fn (torch's own inference, the one its kernel registration checks against) and
//   takes the names from args: "bitpack(Tensor x) -> (Tensor, Tensor)". No schema string is
//   written by hand.
// - csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu register their kernels with CBP_IMPL, whose
//   static_assert fails the build unless the kernel has exactly the type Fn: the CPU and the
//   CUDA kernel of one op have one type (a kernel defined with another signature is also
//   an error against its declaration in <op>_api.h).
#pragma once

#include <ATen/core/op_registration/infer_schema.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>

namespace cbp {

// The schema string of Op, e.g. "bitpack(Tensor x) -> (Tensor, Tensor)": types as torch infers
// them from Op::Fn, names from Op::args; a name ending in '!' gives its Tensor / Tensor[] a
// fresh write alias set ("Tensor(a!)[] grads").
template <typename Op>
std::string op_schema() {
  using Traits = c10::guts::infer_function_traits_t<typename Op::Fn>;
  static_assert(Op::args.size() == Traits::number_of_parameters, "Op::args must name every argument of Op::Fn");
  const c10::FunctionSchema inferred = c10::inferFunctionSchemaFlattenedReturns<typename Op::Fn>();
  std::string s = std::string(Op::name) + "(";
  char alias = 'a';
  for (std::size_t i = 0; i < Op::args.size(); ++i) {
    std::string_view name = Op::args[i];
    std::string type = inferred.arguments()[i].real_type()->str();  // Tensor, Tensor[], Tensor?, int[], float...
    if (!name.empty() && name.back() == '!') {
      name.remove_suffix(1);
      TORCH_CHECK(type.rfind("Tensor", 0) == 0, Op::name, ": only a Tensor argument can be written in place (",
                  name, " is ", type, ")");
      type.insert(6, std::string("(") + alias++ + "!)");
    }
    s += (i > 0 ? ", " : "") + type + " " + std::string(name);
  }
  s += ") -> ";
  const auto& returns = inferred.returns();
  if (returns.size() == 1) return s + returns[0].real_type()->str();
  s += "(";
  for (std::size_t i = 0; i < returns.size(); ++i) s += (i > 0 ? ", " : "") + returns[i].real_type()->str();
  return s + ")";
}

// Defines Op's schema in a TORCH_LIBRARY(_FRAGMENT) block (csrc/register.cpp).
template <typename Op>
void define(torch::Library& m) {
  m.def(op_schema<Op>().c_str());
}

}  // namespace cbp

// In a TORCH_LIBRARY_IMPL block: registers kernel FN for op struct OP, after checking at
// compile time that FN has the type OP::Fn declared in csrc/common/<op>_api.h.
#define CBP_IMPL(m, OP, FN)                                                                                  \
  do {                                                                                                       \
    static_assert(std::is_same_v<decltype(FN), OP::Fn>,                                                      \
                  #FN " must have the type " #OP "::Fn declared in csrc/common/*_api.h");                   \
    (m).impl(OP::name, &FN);                                                                                 \
  } while (0)

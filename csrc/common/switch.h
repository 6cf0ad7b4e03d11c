// Run-time flags to compile-time ones: one branch per value, each calling the same generic lambda
// with a std::bool_constant, so a launcher names each kernel template once however many flags
// the attention variant has (nest the calls for several flags).
#pragma once
#include <type_traits>

namespace fat {

// f(std::true_type{}) or f(std::false_type{}); read the value as decltype(arg)::value.
template <typename F>
decltype(auto) bool_switch(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace fat

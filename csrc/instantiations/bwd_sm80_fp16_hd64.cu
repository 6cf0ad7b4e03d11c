#include "../sm80/bwd_launch.h"
template cudaError_t fat::run_bwd_sm80<__half, 64>(const BwdParams&, bool, cudaStream_t);
template cudaError_t fat::run_bwd_dsum<__half, 64>(const BwdParams&, cudaStream_t);
template cudaError_t fat::run_bwd_dq_convert<__half, 64>(const BwdParams&, void*, int64_t, int64_t, int64_t, cudaStream_t);

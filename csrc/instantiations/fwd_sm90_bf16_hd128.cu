#include "../sm90/fwd_launch.h"
template cudaError_t fat::run_fwd_sm90<__nv_bfloat16, 128>(const FwdParams&, bool, cudaStream_t);

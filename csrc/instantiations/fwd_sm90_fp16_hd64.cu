#include "../sm90/fwd_launch.h"
template cudaError_t fat::run_fwd_sm90<__half, 64>(const FwdParams&, bool, cudaStream_t);

#include "../sm90/bwd_launch.h"
template cudaError_t fat::run_bwd_sm90<__half, 128>(const BwdParams&, bool, cudaStream_t);

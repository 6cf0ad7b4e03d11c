#include "../sm80/fwd_launch.h"
template cudaError_t fat::run_fwd_sm80<__half, 64>(const FwdParams&, bool, cudaStream_t);

// The CPU build of torch ships c10's CUDA headers without this generated file; a CUDA build of torch
// has the real one. Used only to compile csrc/ on machines without a CUDA torch (compile check).
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS

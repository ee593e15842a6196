/*
 * Internals shared by the launcher's two translation units (rqMoeHost.cpp, rqMoeLauncher.cpp); not installed.
 */
#pragma once

#include "rqMoeKernelTable.h"

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace rq
{

constexpr size_t kAlign = 256; // workspace and table buffers: more than the 16 bytes the cubins assume

inline size_t alignUp(size_t v) noexcept
{
    return (v + kAlign - 1) / kAlign * kAlign;
}

//! Byte offsets of consecutive buffers in one allocation, each aligned to kAlign (a plan: allocates nothing).
class BufferPlan
{
public:
    size_t take(size_t bytes) noexcept
    {
        size_t const start = mEnd;
        mEnd += alignUp(bytes > 0 ? bytes : 1);
        return start;
    }
    size_t total() const noexcept
    {
        return mEnd;
    }

private:
    size_t mEnd{0};
};

inline int64_t cdiv(int64_t a, int64_t b) noexcept
{
    return (a + b - 1) / b;
}

template <typename... Args>
std::string concat(Args const&... args)
{
    std::ostringstream s;
    (s << ... << args);
    return s.str();
}

//! The cubin of `variant` in `table` that runs on compute capability `arch`, or null: the exact architecture,
//! else the newest portable (not architecture-specific) cubin of the same major version below it.
EmbeddedKernel const* pickKernel(EmbeddedKernel const* table, int32_t size, char const* variant, int32_t arch) noexcept;

//! pickKernel over the embedded cubins (see cubinArchFor).
EmbeddedKernel const* findKernel(char const* variant, int32_t arch) noexcept;

//! Every variant the launcher may launch, as rq.kernels.aot names them.
std::vector<std::string> variantNames();

} // namespace rq

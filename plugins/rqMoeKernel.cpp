/*
 * rq::RQMoE launcher (see rqMoeKernel.h).
 *
 * The CUDA driver API is resolved with dlopen("libcuda.so.1") at initialize(), so the library links
 * without a GPU driver and its host logic is tested on machines without one. Grids mirror
 * rq/kernels/moe.py; tile sizes come from the generated rqMoeCubins.h.
 */
#include "rqMoeKernel.h"

#include "rqMoeCubins.h"

#include <cuda.h>
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <mutex>
#include <numeric>
#include <sstream>

namespace rq
{
namespace
{

constexpr size_t kAlign = 256;
constexpr char const* kActivationNames[] = {"silu_glu", "gelu_glu", "gelu_tanh_glu", "gelu", "gelu_tanh", "relu"};

size_t alignUp(size_t v) noexcept
{
    return (v + kAlign - 1) / kAlign * kAlign;
}

int64_t cdiv(int64_t a, int64_t b) noexcept
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

//! The driver entry points the launcher uses, resolved once from libcuda.so.1.
struct DriverApi
{
    CUresult (*init)(unsigned int){nullptr};
    CUresult (*ctxGetDevice)(CUdevice*){nullptr};
    CUresult (*deviceGetAttribute)(int*, CUdevice_attribute, CUdevice){nullptr};
    CUresult (*moduleLoadData)(CUmodule*, void const*){nullptr};
    CUresult (*moduleUnload)(CUmodule){nullptr};
    CUresult (*moduleGetFunction)(CUfunction*, CUmodule, char const*){nullptr};
    CUresult (*funcSetAttribute)(CUfunction, CUfunction_attribute, int){nullptr};
    CUresult (*launchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
        CUstream, void**, void**){nullptr};
    CUresult (*memAlloc)(CUdeviceptr*, size_t){nullptr};
    CUresult (*memFree)(CUdeviceptr){nullptr};
    CUresult (*memcpyHtoD)(CUdeviceptr, void const*, size_t){nullptr};
    CUresult (*memsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream){nullptr};
    CUresult (*getErrorString)(CUresult, char const**){nullptr};
    bool ok{false};
};

template <typename F>
bool resolve(void* lib, char const* name, F& fn)
{
    fn = reinterpret_cast<F>(dlsym(lib, name));
    return fn != nullptr;
}

DriverApi const& driverApi()
{
    static DriverApi api = [] {
        DriverApi a;
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (lib == nullptr)
        {
            return a;
        }
        // Versioned names: cuda.h maps cuMemAlloc to cuMemAlloc_v2 and so on.
        a.ok = resolve(lib, "cuInit", a.init) && resolve(lib, "cuCtxGetDevice", a.ctxGetDevice)
            && resolve(lib, "cuDeviceGetAttribute", a.deviceGetAttribute)
            && resolve(lib, "cuModuleLoadData", a.moduleLoadData) && resolve(lib, "cuModuleUnload", a.moduleUnload)
            && resolve(lib, "cuModuleGetFunction", a.moduleGetFunction)
            && resolve(lib, "cuFuncSetAttribute", a.funcSetAttribute)
            && resolve(lib, "cuLaunchKernel", a.launchKernel) && resolve(lib, "cuMemAlloc_v2", a.memAlloc)
            && resolve(lib, "cuMemFree_v2", a.memFree) && resolve(lib, "cuMemcpyHtoD_v2", a.memcpyHtoD)
            && resolve(lib, "cuMemsetD8Async", a.memsetD8Async) && resolve(lib, "cuGetErrorString", a.getErrorString);
        return a;
    }();
    return api;
}

std::string driverError(DriverApi const& api, CUresult r, char const* what)
{
    char const* s = nullptr;
    if (api.getErrorString != nullptr)
    {
        api.getErrorString(r, &s);
    }
    return concat(what, " failed: ", s != nullptr ? s : "unknown CUDA error", " (", static_cast<int>(r), ")");
}

//! Best cubin for `arch`: exact match, else the newest of the same major version not above it.
EmbeddedKernel const* findKernel(char const* name, int32_t arch) noexcept
{
    EmbeddedKernel const* best = nullptr;
    for (int32_t i = 0; i < kNumEmbeddedKernels; ++i)
    {
        EmbeddedKernel const& k = kEmbeddedKernels[i];
        if (std::strcmp(k.name, name) != 0 || k.arch / 10 != arch / 10 || k.arch > arch)
        {
            continue;
        }
        // sm_90 cubins of Triton use sm_90a instructions: they run on 9.0 only.
        if (k.arch == 90 && arch != 90)
        {
            continue;
        }
        if (best == nullptr || k.arch > best->arch)
        {
            best = &k;
        }
    }
    return best;
}

std::vector<std::string> variantNames()
{
    std::vector<std::string> names{"dispatch_count_i32", "dispatch_count_i64", "dispatch_scan", "dispatch_scatter"};
    for (int32_t bm : {kGemmBlockMSmall, kGemmBlockMLarge})
    {
        names.push_back(concat("dispatch_copies_m", bm));
    }
    for (char const* dt : {"f16", "f32"})
    {
        for (char const* cls : {"orig", "int4"})
        {
            for (int32_t bm : {kGemmBlockMSmall, kGemmBlockMLarge})
            {
                names.push_back(concat("expert_in_", dt, "_", cls, "_glu_m", bm));
                names.push_back(concat("expert_in_", dt, "_", cls, "_plain_m", bm));
                names.push_back(concat("expert_out_", dt, "_", cls, "_m", bm));
            }
        }
        names.push_back(concat("combine_", dt));
    }
    return names;
}

//! Kernel arguments with stable addresses: each value lives in its own 8-byte slot.
class ArgPack
{
public:
    ArgPack& ptr(void const* p)
    {
        mSlots[mCount] = reinterpret_cast<uint64_t>(p);
        return push();
    }
    ArgPack& i32(int64_t v)
    {
        int32_t const x = static_cast<int32_t>(v);
        std::memcpy(&mSlots[mCount], &x, sizeof(x));
        return push();
    }
    void** finish()
    {
        ptr(nullptr); // global scratch
        ptr(nullptr); // profile scratch
        for (int32_t i = 0; i < mCount; ++i)
        {
            mArgs[i] = &mSlots[i];
        }
        return mArgs.data();
    }
    int32_t size() const noexcept
    {
        return mCount;
    }

private:
    ArgPack& push()
    {
        ++mCount;
        return *this;
    }
    std::array<uint64_t, 32> mSlots{};
    std::array<void*, 32> mArgs{};
    int32_t mCount{0};
};

} // namespace

char const* toString(Status status) noexcept
{
    switch (status)
    {
    case Status::kSUCCESS: return "success";
    case Status::kBAD_ATTRIBUTE: return "bad attribute";
    case Status::kBAD_SHAPE: return "bad shape";
    case Status::kUNSUPPORTED: return "unsupported";
    case Status::kNO_DRIVER: return "CUDA driver not found";
    case Status::kNO_KERNEL_FOR_ARCH: return "no kernel for this GPU";
    case Status::kCUDA_ERROR: return "CUDA error";
    }
    return "unknown status";
}

int32_t activationCode(std::string const& name) noexcept
{
    for (int32_t i = 0; i < 6; ++i)
    {
        if (name == kActivationNames[i])
        {
            return i;
        }
    }
    return -1;
}

bool isGlu(int32_t code) noexcept
{
    return code >= 0 && code <= 2;
}

Status validateAttributes(MoeAttributes const& a, std::string& message) noexcept
{
    try
    {
        if (a.numExperts < 1)
        {
            message = concat("num_experts must be >= 1, got ", a.numExperts);
            return Status::kBAD_ATTRIBUTE;
        }
        if (a.topK < 1)
        {
            message = concat("top_k must be >= 1, got ", a.topK);
            return Status::kBAD_ATTRIBUTE;
        }
        if (activationCode(a.activation) < 0)
        {
            message = concat("unknown activation '", a.activation,
                "': expected silu_glu, gelu_glu, gelu_tanh_glu, gelu, gelu_tanh or relu");
            return Status::kBAD_ATTRIBUTE;
        }
        if (static_cast<int32_t>(a.copies.size()) != a.numExperts)
        {
            message = concat("copies must have num_experts=", a.numExperts, " entries, got ", a.copies.size());
            return Status::kBAD_ATTRIBUTE;
        }
        int64_t numPhys = 0;
        for (int32_t c : a.copies)
        {
            if (c < 1)
            {
                message = concat("copies entries must be >= 1, got ", c);
                return Status::kBAD_ATTRIBUTE;
            }
            numPhys += c;
        }
        if (static_cast<int64_t>(a.precision.size()) != numPhys)
        {
            message = concat("precision must have one entry per physical copy: expected ", numPhys, ", got ",
                a.precision.size());
            return Status::kBAD_ATTRIBUTE;
        }
        bool anyInt4 = false;
        for (int32_t p : a.precision)
        {
            if (p != 0 && p != 1)
            {
                message = concat("precision entries must be 0 (original) or 1 (int4), got ", p);
                return Status::kBAD_ATTRIBUTE;
            }
            anyInt4 = anyInt4 || p == 1;
        }
        if (anyInt4 && a.groupSize != 64 && a.groupSize != 128)
        {
            message = concat("group_size must be 64 or 128 (the INT4 block sizes), got ", a.groupSize);
            return Status::kBAD_ATTRIBUTE;
        }
        return Status::kSUCCESS;
    }
    catch (...)
    {
        message = "out of memory while validating attributes";
        return Status::kBAD_ATTRIBUTE;
    }
}

CopyTables buildCopyTables(MoeAttributes const& a)
{
    CopyTables t;
    t.logcnt = a.copies;
    t.precision = a.precision;
    int32_t base = 0;
    for (int32_t e = 0; e < a.numExperts; ++e)
    {
        t.base.push_back(base);
        for (int32_t c = 0; c < a.copies[e]; ++c)
        {
            t.phy2log.push_back(e);
        }
        base += a.copies[e];
    }
    for (int32_t p : a.precision)
    {
        t.slot.push_back(p == 1 ? t.numInt4++ : t.numOrig++);
    }
    return t;
}

int32_t chooseBlockM(int64_t numAssign, int32_t numPhys) noexcept
{
    return numAssign <= int64_t{kGemmBlockMSmall} * std::max(numPhys, 1) ? kGemmBlockMSmall : kGemmBlockMLarge;
}

WorkspaceLayout workspaceLayout(MoeDims const& d) noexcept
{
    int64_t const numAssign = d.numTokens * d.topK;
    int64_t const numBlocks = cdiv(std::max<int64_t>(numAssign, 1), kDispatchBlockA);
    size_t const actBytes = d.floatType == FloatType::kFLOAT16 ? 2 : 4;
    WorkspaceLayout w;
    size_t at = 0;
    auto take = [&at](size_t bytes) {
        size_t const start = at;
        at += alignUp(std::max<size_t>(bytes, 1));
        return start;
    };
    w.eid = take(numAssign * 4);
    w.lrank = take(numAssign * 4);
    w.hist = take(numBlocks * d.numExperts * 4);
    w.copyStart = take((d.numPhys + 1) * 4);
    w.tileStart = take(2 * (d.numPhys + 1) * 4);
    w.sortedAssign = take(numAssign * 4);
    w.assignPos = take(numAssign * 4);
    w.phys = take(numAssign * 4);
    w.hiddenAct = take(numAssign * static_cast<size_t>(d.interSize) * actBytes);
    w.expertOut = take(numAssign * static_cast<size_t>(d.hiddenSize) * actBytes);
    w.total = at;
    return w;
}

Status validateDims(MoeDims const& d, MoeAttributes const& a, std::string& message) noexcept
{
    try
    {
        if (d.topK != a.topK)
        {
            message = concat("topk_ids must be [T, top_k=", a.topK, "], got [T, ", d.topK, "]");
            return Status::kBAD_SHAPE;
        }
        if (d.numExperts != a.numExperts)
        {
            message = concat("offsets must be [num_experts=", a.numExperts, "], got [", d.numExperts, "]");
            return Status::kBAD_SHAPE;
        }
        if (d.hiddenSize % 16 != 0 || d.interSize % 16 != 0)
        {
            message = concat("the compiled kernels need H and I to be multiples of 16, got H=", d.hiddenSize,
                " I=", d.interSize);
            return Status::kUNSUPPORTED;
        }
        bool const anyInt4
            = std::any_of(a.precision.begin(), a.precision.end(), [](int32_t p) { return p == 1; });
        if (anyInt4 && (d.hiddenSize % a.groupSize != 0 || d.interSize % a.groupSize != 0))
        {
            message = concat("INT4 copies need H=", d.hiddenSize, " and I=", d.interSize,
                " to be multiples of group_size=", a.groupSize);
            return Status::kBAD_SHAPE;
        }
        if (d.numTokens * d.topK > int64_t{1} << 30)
        {
            message = concat("T*K=", d.numTokens * d.topK, " exceeds the int32 indexing of the kernels");
            return Status::kUNSUPPORTED;
        }
        return Status::kSUCCESS;
    }
    catch (...)
    {
        message = "out of memory while validating shapes";
        return Status::kBAD_SHAPE;
    }
}

int32_t embeddedKernelCount() noexcept
{
    return kNumEmbeddedKernels;
}

bool hasAllKernelsForArch(int32_t arch, std::string& missing) noexcept
{
    try
    {
        missing.clear();
        for (auto const& n : variantNames())
        {
            if (findKernel(n.c_str(), arch) == nullptr)
            {
                missing += (missing.empty() ? "" : ", ") + n;
            }
        }
        return missing.empty();
    }
    catch (...)
    {
        return false;
    }
}

struct MoeLauncher::Impl
{
    struct Loaded
    {
        std::string name;
        CUmodule module{nullptr};
        CUfunction function{nullptr};
        EmbeddedKernel const* kernel{nullptr};
    };

    DriverApi const* api{nullptr};
    std::vector<Loaded> kernels;
    CUdeviceptr tables{0}; // logcnt | base | phy2log | precision | slot | zero offsets
    size_t logcntAt{0}, baseAt{0}, phy2logAt{0}, precisionAt{0}, slotAt{0}, zerosAt{0};
    int32_t device{-1};
    std::mutex mutex;

    Loaded const* get(std::string const& name) const
    {
        for (auto const& k : kernels)
        {
            if (k.name == name)
            {
                return &k;
            }
        }
        return nullptr;
    }

    ~Impl()
    {
        if (api == nullptr)
        {
            return;
        }
        for (auto& k : kernels)
        {
            api->moduleUnload(k.module);
        }
        if (tables != 0)
        {
            api->memFree(tables);
        }
    }
};

MoeLauncher::MoeLauncher(MoeAttributes attrs)
    : mAttrs(std::move(attrs))
    , mTables(buildCopyTables(mAttrs))
    , mImpl(std::make_unique<Impl>())
{
}

MoeLauncher::~MoeLauncher() = default;

Status MoeLauncher::initialize(std::string& message) noexcept
{
    try
    {
        std::lock_guard<std::mutex> lock(mImpl->mutex);
        if (mImpl->device >= 0)
        {
            return Status::kSUCCESS;
        }
        DriverApi const& api = driverApi();
        if (!api.ok)
        {
            message = "could not load the CUDA driver (libcuda.so.1) or one of its entry points";
            return Status::kNO_DRIVER;
        }
        mImpl->api = &api;
        for (auto& k : mImpl->kernels) // a previous, failed initialize
        {
            api.moduleUnload(k.module);
        }
        mImpl->kernels.clear();
        CUdevice dev = 0;
        CUresult r = api.ctxGetDevice(&dev);
        if (r != CUDA_SUCCESS)
        {
            message = driverError(api, r, "cuCtxGetDevice (is a CUDA context current?)");
            return Status::kCUDA_ERROR;
        }
        int major = 0;
        int minor = 0;
        api.deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
        api.deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
        int32_t const arch = major * 10 + minor;
        int optin = 0;
        api.deviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev);
        for (auto const& name : variantNames())
        {
            EmbeddedKernel const* k = findKernel(name.c_str(), arch);
            if (k == nullptr)
            {
                message = concat("no embedded cubin '", name, "' for sm_", arch,
                    "; rebuild the plugin with -DRQ_CUDA_ARCHS including ", arch);
                return Status::kNO_KERNEL_FOR_ARCH;
            }
            if (k->sharedBytes > optin)
            {
                message = concat(name, " needs ", k->sharedBytes, " bytes of shared memory, sm_", arch, " offers ", optin);
                return Status::kUNSUPPORTED;
            }
            Impl::Loaded l;
            l.name = name;
            l.kernel = k;
            if ((r = api.moduleLoadData(&l.module, k->cubin)) != CUDA_SUCCESS)
            {
                message = driverError(api, r, concat("cuModuleLoadData(", name, ")").c_str());
                return Status::kCUDA_ERROR;
            }
            mImpl->kernels.push_back(l);
            if ((r = api.moduleGetFunction(&mImpl->kernels.back().function, l.module, k->entry)) != CUDA_SUCCESS)
            {
                message = driverError(api, r, concat("cuModuleGetFunction(", k->entry, ")").c_str());
                return Status::kCUDA_ERROR;
            }
            if (k->sharedBytes > 48 * 1024)
            {
                r = api.funcSetAttribute(
                    mImpl->kernels.back().function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k->sharedBytes);
                if (r != CUDA_SUCCESS)
                {
                    message = driverError(api, r, "cuFuncSetAttribute(max dynamic shared memory)");
                    return Status::kCUDA_ERROR;
                }
            }
        }
        // Copy tables and a zero offsets vector, uploaded once (no host copies during enqueue/graph capture).
        size_t const n = mTables.logcnt.size();
        size_t const p = mTables.phy2log.size();
        auto& im = *mImpl;
        size_t at = 0;
        auto take = [&at](size_t bytes) {
            size_t const start = at;
            at += alignUp(std::max<size_t>(bytes, 1));
            return start;
        };
        im.logcntAt = take(n * 4);
        im.baseAt = take(n * 4);
        im.phy2logAt = take(p * 4);
        im.precisionAt = take(p * 4);
        im.slotAt = take(p * 4);
        im.zerosAt = take(n * 8);
        std::vector<unsigned char> host(at, 0);
        std::memcpy(host.data() + im.logcntAt, mTables.logcnt.data(), n * 4);
        std::memcpy(host.data() + im.baseAt, mTables.base.data(), n * 4);
        std::memcpy(host.data() + im.phy2logAt, mTables.phy2log.data(), p * 4);
        std::memcpy(host.data() + im.precisionAt, mTables.precision.data(), p * 4);
        std::memcpy(host.data() + im.slotAt, mTables.slot.data(), p * 4);
        if (im.tables != 0)
        {
            api.memFree(im.tables);
            im.tables = 0;
        }
        if ((r = api.memAlloc(&im.tables, at)) != CUDA_SUCCESS)
        {
            message = driverError(api, r, "cuMemAlloc(copy tables)");
            return Status::kCUDA_ERROR;
        }
        if ((r = api.memcpyHtoD(im.tables, host.data(), at)) != CUDA_SUCCESS)
        {
            message = driverError(api, r, "cuMemcpyHtoD(copy tables)");
            return Status::kCUDA_ERROR;
        }
        mImpl->device = static_cast<int32_t>(dev);
        return Status::kSUCCESS;
    }
    catch (std::exception const& e)
    {
        message = concat("initialize: ", e.what());
        return Status::kCUDA_ERROR;
    }
    catch (...)
    {
        message = "initialize: unknown exception";
        return Status::kCUDA_ERROR;
    }
}

Status MoeLauncher::enqueue(MoeDims const& d, MoeTensors const& t, void* workspace, cudaStream_t stream,
    std::string& message) noexcept
{
    try
    {
        Status s = validateDims(d, mAttrs, message);
        if (s != Status::kSUCCESS)
        {
            return s;
        }
        if ((s = initialize(message)) != Status::kSUCCESS)
        {
            return s;
        }
        auto& im = *mImpl;
        DriverApi const& api = *im.api;
        CUstream const cs = reinterpret_cast<CUstream>(stream);
        int64_t const numAssign = d.numTokens * d.topK;
        int32_t const numPhys = static_cast<int32_t>(mTables.phy2log.size());
        if (numAssign == 0)
        {
            CUresult r = api.memsetD8Async(reinterpret_cast<CUdeviceptr>(t.expertCounts), 0, d.numExperts * 8, cs);
            if (r != CUDA_SUCCESS)
            {
                message = driverError(api, r, "cuMemsetD8Async(expert_counts)");
                return Status::kCUDA_ERROR;
            }
            return Status::kSUCCESS;
        }
        WorkspaceLayout const w = workspaceLayout(d);
        auto* ws = static_cast<unsigned char*>(workspace);
        auto table = [&](size_t at) { return reinterpret_cast<void const*>(im.tables + at); };
        void const* offsets = t.offsets != nullptr ? t.offsets : table(im.zerosAt);
        int32_t const blockM = chooseBlockM(numAssign, numPhys);
        int64_t const numBlocks = cdiv(numAssign, kDispatchBlockA);
        char const* dt = d.floatType == FloatType::kFLOAT16 ? "f16" : "f32";
        int32_t const act = activationCode(mAttrs.activation);

        auto launch = [&](std::string const& name, int64_t gx, int64_t gy, ArgPack& args) -> Status {
            Impl::Loaded const* k = im.get(name);
            if (k == nullptr)
            {
                message = concat("kernel ", name, " was not loaded");
                return Status::kNO_KERNEL_FOR_ARCH;
            }
            if (args.size() != k->kernel->numParams)
            {
                message = concat(name, ": launcher passes ", args.size(), " parameters, the cubin takes ",
                    k->kernel->numParams, " (regenerate rqMoeCubins.h)");
                return Status::kUNSUPPORTED;
            }
            if (gx <= 0 || gy <= 0)
            {
                return Status::kSUCCESS;
            }
            CUresult r = api.launchKernel(k->function, static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1,
                32 * k->kernel->numWarps, 1, 1, k->kernel->sharedBytes, cs, args.finish(), nullptr);
            if (r != CUDA_SUCCESS)
            {
                message = driverError(api, r, concat("cuLaunchKernel(", name, ", grid ", gx, "x", gy, ")").c_str());
                return Status::kCUDA_ERROR;
            }
            return Status::kSUCCESS;
        };
        auto wsp = [&](size_t at) { return static_cast<void*>(ws + at); };

        ArgPack count;
        count.ptr(t.topkIds).ptr(wsp(w.eid)).ptr(wsp(w.lrank)).ptr(wsp(w.hist)).i32(numAssign).i32(d.numExperts);
        if ((s = launch(d.ids64 ? "dispatch_count_i64" : "dispatch_count_i32", numBlocks, 1, count)) != Status::kSUCCESS)
        {
            return s;
        }
        ArgPack scan;
        scan.ptr(wsp(w.hist)).ptr(t.expertCounts).i32(numBlocks).i32(d.numExperts);
        if ((s = launch("dispatch_scan", cdiv(d.numExperts, kDispatchBlockN), 1, scan)) != Status::kSUCCESS)
        {
            return s;
        }
        ArgPack copies;
        copies.ptr(t.expertCounts).ptr(offsets).ptr(table(im.logcntAt)).ptr(table(im.baseAt)).ptr(table(im.phy2logAt))
            .ptr(table(im.precisionAt)).ptr(wsp(w.copyStart)).ptr(wsp(w.tileStart)).i32(numPhys);
        if ((s = launch(concat("dispatch_copies_m", blockM), 1, 1, copies)) != Status::kSUCCESS)
        {
            return s;
        }
        ArgPack scatter;
        scatter.ptr(wsp(w.eid)).ptr(wsp(w.lrank)).ptr(wsp(w.hist)).ptr(offsets).ptr(table(im.logcntAt))
            .ptr(table(im.baseAt)).ptr(wsp(w.copyStart)).ptr(wsp(w.sortedAssign)).ptr(wsp(w.assignPos))
            .ptr(wsp(w.phys)).i32(numAssign).i32(d.numExperts);
        if ((s = launch("dispatch_scatter", numBlocks, 1, scatter)) != Status::kSUCCESS)
        {
            return s;
        }
        struct Class
        {
            int32_t count;
            char const* name;
            void const* wIn;
            void const* sIn;
            void const* wOut;
            void const* sOut;
        };
        Class const classes[2] = {{mTables.numOrig, "orig", t.wIn, t.wIn, t.wOut, t.wOut},
            {mTables.numInt4, "int4", t.wInQ, t.wInScales, t.wOutQ, t.wOutScales}};
        for (int32_t c = 0; c < 2; ++c)
        {
            Class const& k = classes[c];
            if (k.count == 0)
            {
                continue;
            }
            int64_t const tiles = cdiv(numAssign, blockM) + k.count; // upper bound; extra programs exit
            void* tileStart = ws + w.tileStart + static_cast<size_t>(c) * (numPhys + 1) * 4;
            ArgPack in;
            in.ptr(t.hidden).ptr(k.wIn).ptr(k.sIn).ptr(wsp(w.hiddenAct)).ptr(wsp(w.sortedAssign))
                .ptr(wsp(w.copyStart)).ptr(tileStart).ptr(table(im.slotAt)).i32(numPhys).i32(d.hiddenSize)
                .i32(d.interSize).i32(d.topK).i32(act).i32(mAttrs.groupSize);
            std::string const inName
                = concat("expert_in_", dt, "_", k.name, isGlu(act) ? "_glu" : "_plain", "_m", blockM);
            if ((s = launch(inName, tiles, cdiv(d.interSize, kGemmBlockN), in)) != Status::kSUCCESS)
            {
                return s;
            }
            ArgPack out;
            out.ptr(wsp(w.hiddenAct)).ptr(k.wOut).ptr(k.sOut).ptr(wsp(w.expertOut)).ptr(wsp(w.sortedAssign))
                .ptr(wsp(w.copyStart)).ptr(tileStart).ptr(table(im.slotAt)).i32(numPhys).i32(d.hiddenSize)
                .i32(d.interSize).i32(mAttrs.groupSize);
            if ((s = launch(concat("expert_out_", dt, "_", k.name, "_m", blockM), tiles, cdiv(d.hiddenSize, kGemmBlockN),
                     out))
                != Status::kSUCCESS)
            {
                return s;
            }
        }
        ArgPack combine;
        combine.ptr(wsp(w.expertOut)).ptr(t.topkWeights).ptr(wsp(w.eid)).ptr(t.y).i32(d.hiddenSize).i32(d.topK)
            .i32(d.numExperts);
        return launch(concat("combine_", dt), d.numTokens, cdiv(d.hiddenSize, kCombineBlockH), combine);
    }
    catch (std::exception const& e)
    {
        message = concat("enqueue: ", e.what());
        return Status::kCUDA_ERROR;
    }
    catch (...)
    {
        message = "enqueue: unknown exception";
        return Status::kCUDA_ERROR;
    }
}

} // namespace rq

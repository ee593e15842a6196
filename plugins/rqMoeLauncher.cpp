/*
 * rq::RQMoE launcher, the CUDA part (see rqMoeLauncher.h; host logic in rqMoeHost.cpp).
 *
 * The CUDA driver API is resolved with dlopen("libcuda.so.1") at initialize(), so the library links
 * without a GPU driver and its host logic is tested on machines without one. Grids mirror
 * rq/kernels/moe.py; tile sizes come from the generated rqMoeKernelTable.h.
 */
#include "rqMoeLauncher.h"
#include "rqMoeInternal.h"

#include <cuda.h>
#include <dlfcn.h>

#include <array>
#include <cstring>
#include <mutex>

namespace rq
{
namespace
{

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
    CUresult (*streamIsCapturing)(CUstream, CUstreamCaptureStatus*){nullptr};
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
            && resolve(lib, "cuMemsetD8Async", a.memsetD8Async)
            && resolve(lib, "cuStreamIsCapturing", a.streamIsCapturing)
            && resolve(lib, "cuGetErrorString", a.getErrorString);
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

bool MoeLauncher::initialized() const noexcept
{
    std::lock_guard<std::mutex> lock(mImpl->mutex);
    return mImpl->device >= 0;
}

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
                std::string built;
                for (int32_t a : embeddedArchs())
                {
                    built += (built.empty() ? "sm_" : ", sm_") + std::to_string(a);
                }
                message = concat("no embedded cubin '", name, "' runs on this GPU (sm_", arch, "); the plugin has cubins for ",
                    built.empty() ? "no architecture" : built, " (sm_90 and later ones run on exactly their own compute ",
                    "capability): rebuild it with -DRQ_CUDA_ARCHS including ", arch);
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
        BufferPlan plan;
        im.logcntAt = plan.take(n * 4);
        im.baseAt = plan.take(n * 4);
        im.phy2logAt = plan.take(p * 4);
        im.precisionAt = plan.take(p * 4);
        im.slotAt = plan.take(p * 4);
        im.zerosAt = plan.take(n * 8);
        size_t const at = plan.total();
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
        if (s != Status::kSUCCESS || (s = checkAlignment(t, workspace, message)) != Status::kSUCCESS)
        {
            return s;
        }
        CUstream const cs = reinterpret_cast<CUstream>(stream);
        if (!initialized())
        {
            // initialize() allocates and copies synchronously: legal now, but not inside a CUDA graph capture.
            DriverApi const& api = driverApi();
            CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
            if (api.ok && api.streamIsCapturing(cs, &capture) == CUDA_SUCCESS && capture != CU_STREAM_CAPTURE_STATUS_NONE)
            {
                message = "the stream is capturing a CUDA graph but the launcher was never initialized: run once "
                          "before capture (TensorRT initializes it when the execution context is created)";
                return Status::kCUDA_ERROR;
            }
            if ((s = initialize(message)) != Status::kSUCCESS)
            {
                return s;
            }
        }
        auto& im = *mImpl;
        DriverApi const& api = *im.api;
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
            .ptr(table(im.precisionAt)).ptr(wsp(w.copyStart)).ptr(wsp(w.tileStart[0])).ptr(wsp(w.tileStart[1]))
            .ptr(wsp(w.tileStart[2])).i32(numPhys);
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
        // Precision classes in code order (docs/spec.md §8): original, INT4 (§5), INT8 (§5a).
        Class const classes[3] = {{mTables.numOrig, "orig", t.wIn, t.wIn, t.wOut, t.wOut},
            {mTables.numInt4, "int4", t.wInQ, t.wInScales, t.wOutQ, t.wOutScales},
            {mTables.numInt8, "int8", t.wInQ8, t.wInScales8, t.wOutQ8, t.wOutScales8}};
        for (int32_t c = 0; c < 3; ++c)
        {
            Class const& k = classes[c];
            if (k.count == 0)
            {
                continue;
            }
            int64_t const tiles = cdiv(numAssign, blockM) + k.count; // upper bound; extra programs exit
            void* tileStart = wsp(w.tileStart[c]);
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

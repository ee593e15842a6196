/*
 * rq::RQMoE launcher: host-side logic and the launch of the AOT-compiled Triton cubins.
 *
 * No TensorRT type appears here, so this library builds and is tested with the CUDA toolkit alone.
 * Every entry point returns a Status (never throws across this header); `message` says what failed,
 * naming the expected and received sizes.
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

typedef struct CUstream_st* cudaStream_t; // same handle as CUstream (cuda_runtime_api.h / cuda.h)

namespace rq
{

enum class Status : int32_t
{
    kSUCCESS = 0,
    kBAD_ATTRIBUTE = 1,      // plugin fields / ONNX attributes are inconsistent
    kBAD_SHAPE = 2,          // tensor shapes do not match docs/spec.md §8
    kUNSUPPORTED = 3,        // a dtype or size the compiled kernels do not cover
    kNO_DRIVER = 4,          // libcuda.so.1 could not be loaded
    kNO_KERNEL_FOR_ARCH = 5, // no embedded cubin for this GPU
    kCUDA_ERROR = 6,         // a driver call failed
};

char const* toString(Status status) noexcept;

//! Activation codes, the index in rq.kernels.reference.ACTIVATIONS.
enum class Activation : int32_t
{
    kSILU_GLU = 0,
    kGELU_GLU = 1,
    kGELU_TANH_GLU = 2,
    kGELU = 3,
    kGELU_TANH = 4,
    kRELU = 5,
};

//! -1 when `name` is not one of docs/spec.md §8's activations.
int32_t activationCode(std::string const& name) noexcept;
bool isGlu(int32_t code) noexcept;

//! The op attributes (docs/spec.md §8), as the plugin creator receives them.
struct MoeAttributes
{
    int32_t numExperts{0};
    int32_t topK{0};
    std::string activation;
    std::vector<int32_t> copies;    // [N] C_e >= 1
    std::vector<int32_t> precision; // [P] 0 original, 1 INT4
    int32_t groupSize{128};
};

//! Checks sizes and ranges of the attributes once (plugin constructor).
Status validateAttributes(MoeAttributes const& attrs, std::string& message) noexcept;

//! int32 copy tables in the layout the dispatch kernels read (rq.kernels.reference.copy_tables).
struct CopyTables
{
    std::vector<int32_t> logcnt;  // [N]
    std::vector<int32_t> base;    // [N] first physical id of each expert
    std::vector<int32_t> phy2log; // [P]
    std::vector<int32_t> precision; // [P]
    std::vector<int32_t> slot;    // [P] index inside the precision class
    int32_t numOrig{0};
    int32_t numInt4{0};
};

CopyTables buildCopyTables(MoeAttributes const& attrs);

enum class FloatType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
};

//! Sizes of one call. hiddenSize and interSize must be multiples of 16 (the cubins assume it).
struct MoeDims
{
    int64_t numTokens{0};
    int32_t topK{0};
    int32_t hiddenSize{0};
    int32_t interSize{0};
    int32_t numExperts{0};
    int32_t numPhys{0};
    FloatType floatType{FloatType::kFLOAT16};
    bool ids64{false};
};

//! Same rule as rq.kernels.moe.launch_config: 16-row tiles when copies get few rows.
int32_t chooseBlockM(int64_t numAssign, int32_t numPhys) noexcept;

//! Byte offsets of the scratch buffers inside the plugin workspace (each 256-byte aligned).
struct WorkspaceLayout
{
    size_t eid{0}, lrank{0}, hist{0}, copyStart{0}, tileStart{0}, sortedAssign{0}, assignPos{0}, phys{0};
    size_t hiddenAct{0}; // [A, I] intermediate
    size_t expertOut{0}; // [A, H] per-assignment expert output
    size_t total{0};
};

WorkspaceLayout workspaceLayout(MoeDims const& dims) noexcept;

//! Checks the dims of a call against the attributes (shape errors say expected vs got).
Status validateDims(MoeDims const& dims, MoeAttributes const& attrs, std::string& message) noexcept;

//! Device pointers of one call, in docs/spec.md §8 input order, then the outputs.
struct MoeTensors
{
    void const* hidden{nullptr};   // [T, H]
    void const* topkIds{nullptr};  // [T, K] int32/int64
    void const* topkWeights{nullptr}; // [T, K]
    void const* offsets{nullptr};  // [N] int64, may be null (zeros)
    void const* wIn{nullptr};      // [P_orig, I_in, H]
    void const* wOut{nullptr};     // [P_orig, H, I]
    void const* wInQ{nullptr};     // [P_int4, I_in, H/2] uint8
    void const* wInScales{nullptr}; // [P_int4, I_in, H/G] fp16
    void const* wOutQ{nullptr};    // [P_int4, H, I/2] uint8
    void const* wOutScales{nullptr}; // [P_int4, H, I/G] fp16
    void* y{nullptr};              // [T, H]
    void* expertCounts{nullptr};   // [N] int64
};

//! Number of embedded cubins and whether one exists for every variant on `arch` (e.g. 90).
int32_t embeddedKernelCount() noexcept;
bool hasAllKernelsForArch(int32_t arch, std::string& missing) noexcept;

//! Loads the cubins for the current CUDA context's device and launches the pipeline.
class MoeLauncher
{
public:
    explicit MoeLauncher(MoeAttributes attrs);
    ~MoeLauncher();
    MoeLauncher(MoeLauncher const&) = delete;
    MoeLauncher& operator=(MoeLauncher const&) = delete;

    //! Loads modules and uploads the copy tables; needs a current CUDA context. Idempotent.
    Status initialize(std::string& message) noexcept;

    //! Enqueues dispatch, expert GEMMs and combine on `stream`. `workspace` holds workspaceLayout(dims).total bytes.
    Status enqueue(MoeDims const& dims, MoeTensors const& tensors, void* workspace, cudaStream_t stream,
        std::string& message) noexcept;

private:
    struct Impl;
    MoeAttributes mAttrs;
    CopyTables mTables;
    std::unique_ptr<Impl> mImpl;
};

} // namespace rq

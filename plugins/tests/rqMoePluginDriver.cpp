/*
 * Drives librq_moe_plugin.so through TensorRT's IPluginV3 interfaces the way TensorRT does, with no TensorRT
 * library: creator -> build-phase calls (output types and shapes, format combinations, configurePlugin,
 * workspace) -> serialization round trip -> attachToContext -> onShapeChange -> enqueue on device buffers,
 * then the same enqueue captured in a CUDA graph and replayed.
 *
 *   rq_moe_plugin_driver PLUGIN.so CASE_DIR [--build-only] [--repeat N]
 *
 * CASE_DIR (written by benchmarks/gpu/plugin_driver.py) holds case.txt and one raw little-endian .bin per input:
 *   attr <name> <int>             num_experts, top_k, group_size
 *   attr activation <name>
 *   ints <name> <v0> <v1> ...     copies, precision
 *   tensor <name> <dtype> <rank> <d0> ...    dtype: f16 f32 i8 u8 i32 i64; inputs in docs/spec.md §8 order
 *                                            (10, or 14 with the INT8 class)
 * It writes y.bin and expert_counts.bin there (the Python side compares them with rq.core.op's reference).
 * --build-only stops before any CUDA call (CI, no GPU). Prints one line per check and "N passed, M failed".
 */
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gPassed = 0;
int gFailed = 0;

bool check(bool ok, std::string const& what)
{
    ++(ok ? gPassed : gFailed);
    std::printf("%s: %s\n", ok ? "PASS" : "FAILED", what.c_str());
    return ok;
}

// --- a constant-only IExprBuilder: every input dimension of the driver is known ---------------------------

class ConstantValue : public apiv::VDimensionExpr
{
public:
    explicit ConstantValue(int64_t v)
        : mValue(v)
    {
    }
    bool isConstant() const override
    {
        return true;
    }
    int64_t getConstantValue() const override
    {
        return mValue;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    int64_t mValue;
};

//! IDimensionExpr is a thin handle on its implementation (mImpl); TensorRT makes these, the driver must too.
class Constant : public IDimensionExpr
{
public:
    explicit Constant(int64_t v)
        : mValue(v)
    {
        mImpl = &mValue;
    }
    ~Constant() noexcept override = default;

private:
    ConstantValue mValue;
};

class ConstantBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        mExprs.emplace_back(value);
        return &mExprs.back();
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override
    {
        int64_t const x = a.getConstantValue();
        int64_t const y = b.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return constant(x + y);
        case DimensionOperation::kPROD: return constant(x * y);
        case DimensionOperation::kMAX: return constant(x > y ? x : y);
        case DimensionOperation::kMIN: return constant(x < y ? x : y);
        case DimensionOperation::kSUB: return constant(x - y);
        case DimensionOperation::kEQUAL: return constant(x == y);
        case DimensionOperation::kLESS: return constant(x < y);
        case DimensionOperation::kFLOOR_DIV: return constant(x / y);
        case DimensionOperation::kCEIL_DIV: return constant((x + y - 1) / y);
        }
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr; // RQMoE has no data-dependent output shape
    }

private:
    std::deque<Constant> mExprs;
};

class ConstantBuilder : public IExprBuilder
{
public:
    ConstantBuilder()
    {
        mImpl = &mBuilder;
    }
    ~ConstantBuilder() noexcept override = default;

private:
    ConstantBuilderImpl mBuilder;
};

// --- the case -------------------------------------------------------------------------------------------

struct Tensor
{
    std::string name;
    DataType type{DataType::kFLOAT};
    Dims dims{};
    std::vector<char> host;

    size_t elementSize() const
    {
        switch (type)
        {
        case DataType::kHALF: return 2;
        case DataType::kINT8:
        case DataType::kUINT8: return 1;
        case DataType::kINT64: return 8;
        default: return 4;
        }
    }
    int64_t count() const
    {
        int64_t n = 1;
        for (int32_t i = 0; i < dims.nbDims; ++i)
        {
            n *= dims.d[i];
        }
        return n;
    }
};

struct Case
{
    std::vector<int32_t> scalars[3]; // num_experts, top_k, group_size (one value each)
    std::string activation;
    std::vector<int32_t> copies, precision;
    std::vector<Tensor> inputs; // docs/spec.md §8 order
};

bool parseType(std::string const& s, DataType& t)
{
    static std::pair<char const*, DataType> const kTypes[] = {{"f16", DataType::kHALF}, {"f32", DataType::kFLOAT},
        {"i8", DataType::kINT8}, {"u8", DataType::kUINT8}, {"i32", DataType::kINT32}, {"i64", DataType::kINT64}};
    for (auto const& [name, type] : kTypes)
    {
        if (s == name)
        {
            t = type;
            return true;
        }
    }
    return false;
}

bool readCase(std::string const& dir, Case& c, std::string& error)
{
    std::ifstream in(dir + "/case.txt");
    if (!in)
    {
        error = "cannot read " + dir + "/case.txt";
        return false;
    }
    std::string line;
    while (std::getline(in, line))
    {
        std::istringstream s(line);
        std::string kind, name;
        s >> kind >> name;
        if (kind == "attr" && name == "activation")
        {
            s >> c.activation;
        }
        else if (kind == "attr")
        {
            int32_t v = 0;
            s >> v;
            int32_t const slot = name == "num_experts" ? 0 : name == "top_k" ? 1 : 2;
            c.scalars[slot] = {v};
        }
        else if (kind == "ints")
        {
            auto& out = name == "copies" ? c.copies : c.precision;
            for (int32_t v = 0; s >> v;)
            {
                out.push_back(v);
            }
        }
        else if (kind == "tensor")
        {
            Tensor t;
            t.name = name;
            std::string type;
            s >> type >> t.dims.nbDims;
            for (int32_t i = 0; i < t.dims.nbDims; ++i)
            {
                s >> t.dims.d[i];
            }
            if (!parseType(type, t.type))
            {
                error = "unknown dtype " + type;
                return false;
            }
            std::ifstream bin(dir + "/" + name + ".bin", std::ios::binary);
            t.host.assign(std::istreambuf_iterator<char>(bin), std::istreambuf_iterator<char>());
            if (static_cast<int64_t>(t.host.size()) != t.count() * static_cast<int64_t>(t.elementSize()))
            {
                error = name + ".bin has " + std::to_string(t.host.size()) + " bytes, its shape needs "
                    + std::to_string(t.count() * t.elementSize());
                return false;
            }
            c.inputs.push_back(std::move(t));
        }
    }
    if (c.inputs.size() != 10 && c.inputs.size() != 14)
    {
        error = "case.txt must list the 10 inputs of docs/spec.md §8 (14 with the INT8 class), got "
            + std::to_string(c.inputs.size());
        return false;
    }
    return true;
}

std::vector<PluginField> fieldsOf(Case const& c)
{
    return {
        PluginField("num_experts", c.scalars[0].data(), PluginFieldType::kINT32, 1),
        PluginField("top_k", c.scalars[1].data(), PluginFieldType::kINT32, 1),
        PluginField("group_size", c.scalars[2].data(), PluginFieldType::kINT32, 1),
        PluginField("activation", c.activation.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(c.activation.size())),
        PluginField("copies", c.copies.data(), PluginFieldType::kINT32, static_cast<int32_t>(c.copies.size())),
        PluginField("precision", c.precision.data(), PluginFieldType::kINT32, static_cast<int32_t>(c.precision.size())),
        PluginField("plugin_namespace", "rq", PluginFieldType::kCHAR, 2), // as the ONNX parser passes every attribute
    };
}

std::vector<DynamicPluginTensorDesc> dynamicDescs(std::vector<PluginTensorDesc> const& descs)
{
    std::vector<DynamicPluginTensorDesc> out(descs.size());
    for (size_t i = 0; i < descs.size(); ++i)
    {
        out[i].desc = descs[i];
        out[i].min = descs[i].dims;
        out[i].opt = descs[i].dims;
        out[i].max = descs[i].dims;
    }
    return out;
}

// --- phases -----------------------------------------------------------------------------------------------

struct Built
{
    std::vector<PluginTensorDesc> in, out; // 10 (or 14) inputs, 2 outputs
    size_t workspace{0};
};

//! The calls TensorRT's builder makes; fills the descriptors the runtime phase uses.
bool buildPhase(IPluginV3* plugin, Case const& c, Built& b)
{
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    if (!check(core != nullptr && build != nullptr, "core and build capabilities"))
    {
        return false;
    }
    check(std::strcmp(core->getPluginName(), "RQMoE") == 0 && std::strcmp(core->getPluginNamespace(), "rq") == 0
            && std::strcmp(core->getPluginVersion(), "1") == 0,
        "plugin rq::RQMoE version 1");
    check(build->getNbOutputs() == 2, "two outputs");

    int32_t const nb = static_cast<int32_t>(c.inputs.size());
    DataType inTypes[14];
    DimsExprs inExprs[14];
    ConstantBuilder exprs;
    for (int32_t i = 0; i < nb; ++i)
    {
        Tensor const& t = c.inputs[i];
        inTypes[i] = t.type;
        inExprs[i].nbDims = t.dims.nbDims;
        for (int32_t d = 0; d < t.dims.nbDims; ++d)
        {
            inExprs[i].d[d] = exprs.constant(t.dims.d[d]);
        }
        PluginTensorDesc desc{};
        desc.dims = t.dims;
        desc.type = t.type;
        desc.format = TensorFormat::kLINEAR;
        desc.scale = 1.0F;
        b.in.push_back(desc);
    }
    DataType outTypes[2];
    check(build->getOutputDataTypes(outTypes, 2, inTypes, nb) == 0 && outTypes[0] == inTypes[0]
            && outTypes[1] == DataType::kINT64,
        "output types: y as hidden, expert_counts INT64");
    DimsExprs outExprs[2];
    bool const shaped = build->getOutputShapes(inExprs, nb, nullptr, 0, outExprs, 2, exprs) == 0;
    int64_t const numTokens = c.inputs[0].dims.d[0];
    int64_t const hidden = c.inputs[0].dims.d[1];
    if (!check(shaped && outExprs[0].nbDims == 2 && outExprs[0].d[0]->getConstantValue() == numTokens
                && outExprs[0].d[1]->getConstantValue() == hidden && outExprs[1].nbDims == 1
                && outExprs[1].d[0]->getConstantValue() == c.scalars[0][0],
            "output shapes y [T, H], expert_counts [N]"))
    {
        return false;
    }
    for (int32_t o = 0; o < 2; ++o)
    {
        PluginTensorDesc desc{};
        desc.dims.nbDims = outExprs[o].nbDims;
        for (int32_t d = 0; d < desc.dims.nbDims; ++d)
        {
            desc.dims.d[d] = outExprs[o].d[d]->getConstantValue();
        }
        desc.type = outTypes[o];
        desc.format = TensorFormat::kLINEAR;
        desc.scale = 1.0F;
        b.out.push_back(desc);
    }
    std::vector<PluginTensorDesc> all = b.in;
    all.insert(all.end(), b.out.begin(), b.out.end());
    std::vector<DynamicPluginTensorDesc> dyn = dynamicDescs(all);
    bool every = true;
    for (int32_t pos = 0; pos < nb + 2; ++pos)
    {
        every = build->supportsFormatCombination(pos, dyn.data(), nb, 2) && every;
    }
    check(every, "supportsFormatCombination accepts every input and output of the case");
    // What a network must not feed the plugin: float packed weights, float32 scales, y of another type.
    std::vector<DynamicPluginTensorDesc> wrong = dyn;
    wrong[6].desc.type = DataType::kFLOAT;
    wrong[7].desc.type = DataType::kFLOAT;
    wrong[nb].desc.type = inTypes[0] == DataType::kHALF ? DataType::kFLOAT : DataType::kHALF;
    check(!build->supportsFormatCombination(6, wrong.data(), nb, 2) && !build->supportsFormatCombination(7, wrong.data(), nb, 2)
            && !build->supportsFormatCombination(nb, wrong.data(), nb, 2),
        "supportsFormatCombination refuses float packed weights, float32 scales and y of another type");
    wrong[6].desc.format = TensorFormat::kCHW32;
    wrong[6].desc.type = inTypes[6];
    check(!build->supportsFormatCombination(6, wrong.data(), nb, 2), "only linear formats");
    if (nb == 14)
    {
        // INT8 values are signed bytes (docs/spec.md §5a), their scales float16.
        wrong = dyn;
        wrong[10].desc.type = DataType::kUINT8;
        wrong[11].desc.type = DataType::kFLOAT;
        wrong[12].desc.type = DataType::kHALF;
        check(!build->supportsFormatCombination(10, wrong.data(), nb, 2) && !build->supportsFormatCombination(11, wrong.data(), nb, 2)
                && !build->supportsFormatCombination(12, wrong.data(), nb, 2),
            "supportsFormatCombination refuses unsigned or float INT8 values and float32 INT8 scales");
    }

    std::vector<DynamicPluginTensorDesc> in = dynamicDescs(b.in);
    std::vector<DynamicPluginTensorDesc> out = dynamicDescs(b.out);
    for (auto* d : {&in[0].desc.dims, &in[1].desc.dims, &in[2].desc.dims, &out[0].desc.dims})
    {
        d->d[0] = -1; // T is dynamic at build time
    }
    check(build->configurePlugin(in.data(), nb, out.data(), 2) == 0, "configurePlugin accepts the case (T dynamic)");
    std::vector<DynamicPluginTensorDesc> bad = in;
    // w_out, else w_out_q, else w_out_q8: the first non-empty class's down projection
    int32_t const down = c.inputs[5].dims.d[0] > 0 ? 5 : c.inputs[8].dims.d[0] > 0 || nb == 10 ? 8 : 12;
    bad[down].desc.dims.d[1] = hidden + 16; // rows: another H
    check(build->configurePlugin(bad.data(), nb, out.data(), 2) != 0,
        std::string("configurePlugin refuses ") + (down == 5 ? "w_out" : down == 8 ? "w_out_q" : "w_out_q8") + " of another H");
    bad = in;
    bad[9].desc.dims.d[2] += 1; // w_out_scales: one scale block too many
    check(build->configurePlugin(bad.data(), nb, out.data(), 2) != 0, "configurePlugin refuses w_out_scales of another I");
    if (nb == 14)
    {
        bool const hasInt8 = c.inputs[10].dims.d[0] > 0;
        bad = in;
        bad[13].desc.dims.d[hasInt8 ? 2 : 0] += 1; // w_out_scales8: one scale block, or one copy, too many
        check(build->configurePlugin(bad.data(), nb, out.data(), 2) != 0,
            hasInt8 ? "configurePlugin refuses w_out_scales8 of another I"
                    : "configurePlugin refuses a non-empty w_out_scales8 without INT8 copies");
        bad = in;
        bad.resize(10); // the INT8 class dropped
        check((build->configurePlugin(bad.data(), 10, out.data(), 2) != 0) == hasInt8,
            hasInt8 ? "configurePlugin refuses INT8 copies without the INT8 inputs"
                    : "configurePlugin takes a node without INT8 copies with or without the (empty) INT8 class");
    }
    b.workspace = build->getWorkspaceSize(dynamicDescs(b.in).data(), nb, dynamicDescs(b.out).data(), 2);
    check(b.workspace > 0, "workspace " + std::to_string(b.workspace) + " bytes");
    return true;
}

bool cuda(cudaError_t e, char const* what)
{
    if (e != cudaSuccess)
    {
        check(false, std::string(what) + ": " + cudaGetErrorString(e));
        return false;
    }
    return true;
}

bool writeFile(std::string const& path, void const* data, size_t bytes)
{
    std::ofstream f(path, std::ios::binary);
    f.write(static_cast<char const*>(data), static_cast<std::streamsize>(bytes));
    return static_cast<bool>(f);
}

//! What an execution context does: attach, onShapeChange, enqueue (direct, then captured in a CUDA graph).
bool runtimePhase(IPluginV3* plugin, Case const& c, Built const& b, std::string const& dir, int32_t repeat)
{
    if (!cuda(cudaSetDevice(0), "cudaSetDevice") || !cuda(cudaFree(nullptr), "CUDA context"))
    {
        return false;
    }
    int major = 0;
    int minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
    std::printf("device: sm_%d%d\n", major, minor);
    auto* deserialized = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::unique_ptr<IPluginV3> attached(deserialized->attachToContext(nullptr));
    if (!check(attached != nullptr, "attachToContext loads the cubins for this GPU"))
    {
        return false;
    }
    auto* rt = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    int32_t const nb = static_cast<int32_t>(c.inputs.size());
    std::vector<void*> inputs(nb, nullptr);
    for (int32_t i = 0; i < nb; ++i)
    {
        Tensor const& t = c.inputs[i];
        if (!t.host.empty()
            && (!cuda(cudaMalloc(&inputs[i], t.host.size()), "cudaMalloc")
                || !cuda(cudaMemcpy(inputs[i], t.host.data(), t.host.size(), cudaMemcpyHostToDevice), "cudaMemcpy")))
        {
            return false;
        }
    }
    size_t const yBytes = static_cast<size_t>(b.in[0].dims.d[0] * b.in[0].dims.d[1]) * (b.in[0].type == DataType::kHALF ? 2 : 4);
    size_t const countBytes = static_cast<size_t>(b.out[1].dims.d[0]) * 8;
    void* outputs[2] = {nullptr, nullptr};
    void* workspace = nullptr;
    cudaStream_t stream = nullptr;
    if (!cuda(cudaMalloc(&outputs[0], yBytes + 16), "cudaMalloc(y)") || !cuda(cudaMalloc(&outputs[1], countBytes), "cudaMalloc")
        || !cuda(cudaMalloc(&workspace, b.workspace), "cudaMalloc(workspace)") || !cuda(cudaStreamCreate(&stream), "stream"))
    {
        return false;
    }
    check(rt->onShapeChange(b.in.data(), nb, b.out.data(), 2) == 0, "onShapeChange");
    bool const ran = rt->enqueue(b.in.data(), b.out.data(), inputs.data(), outputs, workspace, stream) == 0;
    if (!check(ran && cuda(cudaStreamSynchronize(stream), "enqueue"), "enqueue"))
    {
        return false;
    }
    std::vector<char> y(yBytes);
    std::vector<char> counts(countBytes);
    cuda(cudaMemcpy(y.data(), outputs[0], yBytes, cudaMemcpyDeviceToHost), "copy y");
    cuda(cudaMemcpy(counts.data(), outputs[1], countBytes, cudaMemcpyDeviceToHost), "copy expert_counts");
    check(writeFile(dir + "/y.bin", y.data(), yBytes) && writeFile(dir + "/expert_counts.bin", counts.data(), countBytes),
        "outputs written");

    // onShapeChange again and enqueue inside a graph capture: neither may allocate, copy or synchronize.
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    cuda(cudaMemsetAsync(outputs[0], 0, yBytes, stream), "memset");
    bool captured = cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "begin capture");
    captured = captured && rt->onShapeChange(b.in.data(), nb, b.out.data(), 2) == 0;
    captured = rt->enqueue(b.in.data(), b.out.data(), inputs.data(), outputs, workspace, stream) == 0 && captured;
    captured = cuda(cudaStreamEndCapture(stream, &graph), "end capture") && captured;
    captured = captured && cuda(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    captured = captured && cuda(cudaGraphLaunch(exec, stream), "graph launch") && cuda(cudaStreamSynchronize(stream), "sync");
    std::vector<char> yGraph(yBytes);
    cuda(cudaMemcpy(yGraph.data(), outputs[0], yBytes, cudaMemcpyDeviceToHost), "copy y");
    check(captured && yGraph == y, "onShapeChange + enqueue captured in a CUDA graph; the replay equals the direct run bit for bit");

    if (repeat > 0 && captured)
    {
        cudaEvent_t start = nullptr;
        cudaEvent_t stop = nullptr;
        cudaEventCreate(&start);
        cudaEventCreate(&stop);
        cudaEventRecord(start, stream);
        for (int32_t i = 0; i < repeat; ++i)
        {
            cudaGraphLaunch(exec, stream);
        }
        cudaEventRecord(stop, stream);
        cudaEventSynchronize(stop);
        float ms = 0.0F;
        cudaEventElapsedTime(&ms, start, stop);
        std::printf("enqueue (graph replay): %.2f us mean over %d\n", 1000.0 * ms / repeat, repeat);
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
    }
    if (exec != nullptr)
    {
        cudaGraphExecDestroy(exec);
    }
    if (graph != nullptr)
    {
        cudaGraphDestroy(graph);
    }
    for (void* p : inputs)
    {
        cudaFree(p);
    }
    cudaFree(outputs[0]);
    cudaFree(outputs[1]);
    cudaFree(workspace);
    cudaStreamDestroy(stream);
    return true;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 3)
    {
        std::fprintf(stderr, "usage: %s PLUGIN.so CASE_DIR [--build-only] [--repeat N]\n", argv[0]);
        return 2;
    }
    bool buildOnly = false;
    int32_t repeat = 0;
    for (int i = 3; i < argc; ++i)
    {
        buildOnly = buildOnly || std::strcmp(argv[i], "--build-only") == 0;
        if (std::strcmp(argv[i], "--repeat") == 0 && i + 1 < argc)
        {
            repeat = std::atoi(argv[++i]);
        }
    }
    Case c;
    std::string error;
    if (!readCase(argv[2], c, error))
    {
        std::fprintf(stderr, "%s\n", error.c_str());
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators != nullptr ? getCreators(nbCreators) : nullptr;
    if (!check(creators != nullptr && nbCreators == 1 && std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0,
            "getCreators: one IPluginCreatorV3One"))
    {
        return 1;
    }
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "RQMoE") == 0 && creator->getFieldNames()->nbFields == 6,
        "creator RQMoE with six fields");
    std::vector<PluginField> fields = fieldsOf(c);
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("rq_moe_0", &fc, TensorRTPhase::kBUILD));
    Built built;
    if (!check(plugin != nullptr, "createPlugin (build phase)") || !buildPhase(plugin.get(), c, built))
    {
        std::printf("%d passed, %d failed\n", gPassed, gFailed);
        return 1;
    }
    // The engine stores getFieldsToSerialize(); deserialization recreates the plugin from it.
    auto* runtimeCaps = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* saved = runtimeCaps->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> restored(creator->createPlugin("rq_moe_0", saved, TensorRTPhase::kRUNTIME));
    check(restored != nullptr && saved->nbFields == 6, "serialized fields recreate the plugin (runtime phase)");
    std::vector<PluginField> broken = fields;
    int32_t const badGroup = 32;
    broken[2] = PluginField("group_size", &badGroup, PluginFieldType::kINT32, 1);
    PluginFieldCollection badFc{static_cast<int32_t>(broken.size()), broken.data()};
    std::unique_ptr<IPluginV3> refused(creator->createPlugin("rq_moe_bad", &badFc, TensorRTPhase::kBUILD));
    check(refused == nullptr || c.precision == std::vector<int32_t>(c.precision.size(), 0),
        "createPlugin refuses group_size 32 for INT4 copies");
    if (!buildOnly && restored != nullptr)
    {
        runtimePhase(restored.get(), c, built, argv[2], repeat);
    }
    std::printf("%d passed, %d failed\n", gPassed, gFailed);
    return gFailed == 0 ? 0 : 1;
}

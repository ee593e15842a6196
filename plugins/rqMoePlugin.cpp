/*
 * TensorRT plugin for rq::RQMoE (see rqMoePlugin.h). Every noexcept method wraps its body: no exception
 * crosses into TensorRT, failures are logged through TensorRT's logger and returned as error codes.
 */
#include "rqMoePlugin.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <mutex>
#include <stdexcept>

using namespace nvinfer1;

namespace rq
{
namespace
{

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder{nullptr};

void logMessage(ILogger::Severity severity, std::string const& msg) noexcept
{
    try
    {
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
        std::string const line = std::string("[rq::RQMoE] ") + msg;
        if (logger != nullptr)
        {
            logger->log(severity, line.c_str());
        }
        else if (severity <= ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    }
    catch (...)
    {
    }
}

void logError(std::string const& msg) noexcept
{
    logMessage(ILogger::Severity::kERROR, msg);
}

//! Runs `body`, turning any exception into a logged error and `onError`.
template <typename T, typename F>
T guarded(char const* where, T onError, F&& body) noexcept
{
    try
    {
        return body();
    }
    catch (std::exception const& e)
    {
        logError(std::string(where) + ": " + e.what());
    }
    catch (...)
    {
        logError(std::string(where) + ": unknown exception");
    }
    return onError;
}

Shape toShape(Dims const& d)
{
    return Shape(d.d, d.d + std::max<int32_t>(d.nbDims, 0));
}

//! Reads an integer field stored as INT32 (TensorRT's ONNX parser) or INT64.
bool readInts(PluginField const& f, std::vector<int32_t>& out)
{
    out.clear();
    if (f.type == PluginFieldType::kINT32)
    {
        auto const* p = static_cast<int32_t const*>(f.data);
        out.assign(p, p + f.length);
        return true;
    }
    if (f.type == PluginFieldType::kINT64)
    {
        auto const* p = static_cast<int64_t const*>(f.data);
        for (int32_t i = 0; i < f.length; ++i)
        {
            out.push_back(static_cast<int32_t>(p[i]));
        }
        return true;
    }
    return false;
}

} // namespace

Status parseFields(PluginFieldCollection const& fc, MoeAttributes& attrs, std::string& message) noexcept
{
    try
    {
        bool seen[6] = {false, false, false, false, false, false};
        for (int32_t i = 0; i < fc.nbFields; ++i)
        {
            PluginField const& f = fc.fields[i];
            if (f.name == nullptr)
            {
                continue;
            }
            std::string const name(f.name);
            std::vector<int32_t> ints;
            if (name == "activation")
            {
                if (f.type != PluginFieldType::kCHAR)
                {
                    message = "field 'activation' must be a string (CHAR)";
                    return Status::kBAD_ATTRIBUTE;
                }
                std::string s(static_cast<char const*>(f.data), static_cast<size_t>(f.length));
                s.erase(std::find(s.begin(), s.end(), '\0'), s.end());
                attrs.activation = s;
                seen[2] = true;
                continue;
            }
            int32_t const slot = name == "num_experts" ? 0
                : name == "top_k"                      ? 1
                : name == "copies"                     ? 3
                : name == "precision"                  ? 4
                : name == "group_size"                 ? 5
                                                       : -1;
            if (slot < 0)
            {
                continue; // plugin_namespace, plugin_version and unknown extras
            }
            if (!readInts(f, ints) || ((slot == 0 || slot == 1 || slot == 5) && ints.size() != 1))
            {
                message = "field '" + name + "' must be INT32 (or INT64)" + (slot == 3 || slot == 4 ? " array" : " scalar");
                return Status::kBAD_ATTRIBUTE;
            }
            seen[slot] = true;
            switch (slot)
            {
            case 0: attrs.numExperts = ints[0]; break;
            case 1: attrs.topK = ints[0]; break;
            case 3: attrs.copies = ints; break;
            case 4: attrs.precision = ints; break;
            default: attrs.groupSize = ints[0]; break;
            }
        }
        char const* names[6] = {"num_experts", "top_k", "activation", "copies", "precision", "group_size"};
        for (int32_t i = 0; i < 5; ++i) // group_size may be absent when no copy is quantized (default 128)
        {
            if (!seen[i])
            {
                message = std::string("missing plugin field '") + names[i] + "'";
                return Status::kBAD_ATTRIBUTE;
            }
        }
        return validateAttributes(attrs, message);
    }
    catch (...)
    {
        message = "out of memory while parsing plugin fields";
        return Status::kBAD_ATTRIBUTE;
    }
}

RQMoEPlugin::RQMoEPlugin(MoeAttributes attrs)
    : mAttrs(std::move(attrs))
{
    std::string message;
    if (validateAttributes(mAttrs, message) != Status::kSUCCESS)
    {
        throw std::invalid_argument(message);
    }
    mNumOrig = static_cast<int32_t>(std::count(mAttrs.precision.begin(), mAttrs.precision.end(), 0));
    mNumInt4 = static_cast<int32_t>(std::count(mAttrs.precision.begin(), mAttrs.precision.end(), 1));
    mNumInt8 = static_cast<int32_t>(std::count(mAttrs.precision.begin(), mAttrs.precision.end(), 2));
    mSerialFields = {
        PluginField("num_experts", &mAttrs.numExperts, PluginFieldType::kINT32, 1),
        PluginField("top_k", &mAttrs.topK, PluginFieldType::kINT32, 1),
        PluginField("activation", mAttrs.activation.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(mAttrs.activation.size() + 1)),
        PluginField("copies", mAttrs.copies.data(), PluginFieldType::kINT32, static_cast<int32_t>(mAttrs.copies.size())),
        PluginField("precision", mAttrs.precision.data(), PluginFieldType::kINT32,
            static_cast<int32_t>(mAttrs.precision.size())),
        PluginField("group_size", &mAttrs.groupSize, PluginFieldType::kINT32, 1),
    };
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
}

IPluginCapability* RQMoEPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    return guarded<IPluginCapability*>("getCapabilityInterface", nullptr, [&]() -> IPluginCapability* {
        switch (type)
        {
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        }
        return nullptr;
    });
}

IPluginV3* RQMoEPlugin::clone() noexcept
{
    return guarded<IPluginV3*>("clone", nullptr, [&] { return new RQMoEPlugin(mAttrs); });
}

char const* RQMoEPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* RQMoEPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* RQMoEPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t RQMoEPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

int32_t RQMoEPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    return guarded<int32_t>("getOutputDataTypes", -1, [&] {
        if (!validInputCount(nbInputs) || nbOutputs != kNB_OUTPUTS)
        {
            logError("expected 10 inputs (14 with the INT8 class) and 2 outputs (docs/spec.md §8), got "
                + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
            return -1;
        }
        outputTypes[0] = inputTypes[kHIDDEN];
        outputTypes[1] = DataType::kINT64;
        return 0;
    });
}

int32_t RQMoEPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    return guarded<int32_t>("getOutputShapes", -1, [&] {
        if (!validInputCount(nbInputs) || nbOutputs != kNB_OUTPUTS || inputs[kHIDDEN].nbDims != 2)
        {
            logError("getOutputShapes: expected hidden [T, H] and 10 (or 14) inputs / 2 outputs");
            return -1;
        }
        outputs[0] = inputs[kHIDDEN]; // y [T, H]
        outputs[1].nbDims = 1;        // expert_counts [N]
        outputs[1].d[0] = exprBuilder.constant(mAttrs.numExperts);
        return 0;
    });
}

bool RQMoEPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return guarded<bool>("supportsFormatCombination", false, [&] {
        if (!validInputCount(nbInputs) || nbOutputs != kNB_OUTPUTS || pos < 0 || pos >= nbInputs + nbOutputs)
        {
            return false;
        }
        PluginTensorDesc const& d = inOut[pos].desc;
        if (d.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        DataType const act = inOut[kHIDDEN].desc.type;
        if (pos == nbInputs)
        {
            return d.type == act; // y
        }
        if (pos == nbInputs + 1)
        {
            return d.type == DataType::kINT64; // expert_counts
        }
        switch (pos)
        {
        case kHIDDEN: return d.type == DataType::kHALF || d.type == DataType::kFLOAT;
        case kTOPK_IDS: return d.type == DataType::kINT32 || d.type == DataType::kINT64;
        case kOFFSETS: return d.type == DataType::kINT64;
        case kTOPK_WEIGHTS:
        case kW_IN:
        case kW_OUT: return d.type == act;
        // Packed INT4 bytes: INT8 as the ONNX file stores them (docs/spec.md §5: TensorRT's parser would widen
        // UINT8 initializers to INT32); UINT8 too, the same bytes, for networks built through the API.
        case kW_IN_Q:
        case kW_OUT_Q: return d.type == DataType::kINT8 || d.type == DataType::kUINT8;
        // INT8 values (docs/spec.md §5a), one signed byte each.
        case kW_IN_Q8:
        case kW_OUT_Q8: return d.type == DataType::kINT8;
        case kW_IN_SCALES:
        case kW_OUT_SCALES:
        case kW_IN_SCALES8:
        case kW_OUT_SCALES8: return d.type == DataType::kHALF;
        default: return false;
        }
    });
}

int32_t RQMoEPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    return guarded<int32_t>("configurePlugin", -1, [&] {
        if (!validInputCount(nbInputs) || nbOutputs != kNB_OUTPUTS)
        {
            logError("expected 10 inputs (14 with the INT8 class) and 2 outputs (docs/spec.md §8)");
            return -1;
        }
        // Dynamic dimensions are -1 here: every static one (H, I, K, N, copies) is checked now, at build time.
        Shape shapes[kNB_INPUTS_INT8];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            shapes[i] = toShape(in[i].desc.dims);
        }
        MoeDims dims;
        std::string message;
        if (validateShapes(mAttrs, shapes, nbInputs, dims, message) != Status::kSUCCESS)
        {
            logError(message);
            return -1;
        }
        return 0;
    });
}

MoeDims RQMoEPlugin::dimsOf(PluginTensorDesc const* in) const noexcept
{
    MoeDims d;
    d.numTokens = in[kHIDDEN].dims.d[0];
    d.hiddenSize = static_cast<int32_t>(in[kHIDDEN].dims.d[1]);
    d.topK = static_cast<int32_t>(in[kTOPK_IDS].dims.d[1]);
    d.numExperts = static_cast<int32_t>(in[kOFFSETS].dims.d[0]);
    d.numPhys = static_cast<int32_t>(mAttrs.precision.size());
    int64_t const inRows = mNumOrig > 0 ? in[kW_IN].dims.d[1] : mNumInt4 > 0 ? in[kW_IN_Q].dims.d[1] : in[kW_IN_Q8].dims.d[1];
    d.interSize = static_cast<int32_t>(isGlu(activationCode(mAttrs.activation)) ? inRows / 2 : inRows);
    d.floatType = in[kHIDDEN].type == DataType::kHALF ? FloatType::kFLOAT16 : FloatType::kFLOAT32;
    d.ids64 = in[kTOPK_IDS].type == DataType::kINT64;
    return d;
}

size_t RQMoEPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const* /*outputs*/,
    int32_t /*nbOutputs*/) const noexcept
{
    return guarded<size_t>("getWorkspaceSize", 0, [&]() -> size_t {
        if (!validInputCount(nbInputs))
        {
            return 0;
        }
        // Sized for the profile's largest T: enough for any smaller call.
        PluginTensorDesc descs[kNB_INPUTS_INT8];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            descs[i] = inputs[i].desc;
            descs[i].dims = inputs[i].max;
        }
        return workspaceLayout(dimsOf(descs)).total;
    });
}

int32_t RQMoEPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    // Validation only: TensorRT may call this while the application captures a CUDA graph, so no CUDA call
    // (allocation, copy, module load) happens here; attachToContext did them.
    return guarded<int32_t>("onShapeChange", -1, [&] {
        if (!validInputCount(nbInputs) || nbOutputs != kNB_OUTPUTS)
        {
            return -1;
        }
        Shape shapes[kNB_INPUTS_INT8];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            shapes[i] = toShape(in[i].dims);
        }
        MoeDims dims;
        std::string message;
        if (validateShapes(mAttrs, shapes, nbInputs, dims, message) != Status::kSUCCESS)
        {
            logError(message);
            return -1;
        }
        return 0;
    });
}

int32_t RQMoEPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    return guarded<int32_t>("enqueue", -1, [&] {
        if (!mLauncher)
        {
            mLauncher = std::make_unique<MoeLauncher>(mAttrs);
        }
        MoeTensors t;
        t.hidden = inputs[kHIDDEN];
        t.topkIds = inputs[kTOPK_IDS];
        t.topkWeights = inputs[kTOPK_WEIGHTS];
        t.offsets = inputs[kOFFSETS];
        t.wIn = inputs[kW_IN];
        t.wOut = inputs[kW_OUT];
        t.wInQ = inputs[kW_IN_Q];
        t.wInScales = inputs[kW_IN_SCALES];
        t.wOutQ = inputs[kW_OUT_Q];
        t.wOutScales = inputs[kW_OUT_SCALES];
        if (mNumInt8 > 0) // onShapeChange checked that a node with INT8 copies has the 14 inputs
        {
            t.wInQ8 = inputs[kW_IN_Q8];
            t.wInScales8 = inputs[kW_IN_SCALES8];
            t.wOutQ8 = inputs[kW_OUT_Q8];
            t.wOutScales8 = inputs[kW_OUT_SCALES8];
        }
        t.y = outputs[0];
        t.expertCounts = outputs[1];
        std::string message;
        Status const s = mLauncher->enqueue(dimsOf(inputDesc), t, workspace, stream, message);
        if (s != Status::kSUCCESS)
        {
            logError(std::string(toString(s)) + ": " + message);
            return static_cast<int32_t>(s);
        }
        return 0;
    });
}

IPluginV3* RQMoEPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // A new execution context: the one moment outside enqueue (and any graph capture) with the CUDA context
    // current, so the runtime clone loads its cubins and uploads its copy tables here.
    return guarded<IPluginV3*>("attachToContext", nullptr, [&]() -> IPluginV3* {
        auto runtime = std::make_unique<RQMoEPlugin>(mAttrs);
        runtime->mLauncher = std::make_unique<MoeLauncher>(mAttrs);
        std::string message;
        Status const s = runtime->mLauncher->initialize(message);
        if (s != Status::kSUCCESS)
        {
            logError(std::string(toString(s)) + ": " + message);
            return nullptr;
        }
        return runtime.release();
    });
}

PluginFieldCollection const* RQMoEPlugin::getFieldsToSerialize() noexcept
{
    return &mSerialCollection;
}

RQMoEPluginCreator::RQMoEPluginCreator()
{
    mFields = {
        PluginField("num_experts", nullptr, PluginFieldType::kINT32, 1),
        PluginField("top_k", nullptr, PluginFieldType::kINT32, 1),
        PluginField("activation", nullptr, PluginFieldType::kCHAR, 0),
        PluginField("copies", nullptr, PluginFieldType::kINT32, 0),
        PluginField("precision", nullptr, PluginFieldType::kINT32, 0),
        PluginField("group_size", nullptr, PluginFieldType::kINT32, 1),
    };
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
}

char const* RQMoEPluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* RQMoEPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* RQMoEPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* RQMoEPluginCreator::getFieldNames() noexcept
{
    return &mCollection;
}

IPluginV3* RQMoEPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    return guarded<IPluginV3*>("createPlugin", nullptr, [&]() -> IPluginV3* {
        if (fc == nullptr)
        {
            logError("createPlugin: no plugin fields");
            return nullptr;
        }
        MoeAttributes attrs;
        std::string message;
        if (parseFields(*fc, attrs, message) != Status::kSUCCESS)
        {
            logError(std::string("node ") + (name != nullptr ? name : "?") + ": " + message);
            return nullptr;
        }
        return new RQMoEPlugin(std::move(attrs));
    });
}

} // namespace rq

extern "C" __attribute__((visibility("default"))) char const* rqMoePluginInfo() noexcept
{
    static std::string const info = [] {
        try
        {
            std::string s = std::string("{\"plugin\": \"") + rq::kPLUGIN_NAMESPACE + "::" + rq::kPLUGIN_NAME
                + "\", \"version\": \"" + rq::kPLUGIN_VERSION + "\", \"archs\": [";
            std::vector<int32_t> const archs = rq::embeddedArchs();
            for (size_t i = 0; i < archs.size(); ++i)
            {
                s += (i ? ", " : "") + std::to_string(archs[i]);
            }
            // Copy precisions this build runs (docs/spec.md §8 codes: original, INT4, INT8).
            s += "], \"kernels\": " + std::to_string(rq::embeddedKernelCount()) + ", \"precisions\": [0, 1, 2]"
                + ", \"activations\": [";
            for (int32_t code = 0; code < rq::numActivations(); ++code)
            {
                s += std::string(code ? ", " : "") + "[\"" + rq::activationName(code) + "\", "
                    + (rq::isGlu(code) ? "true" : "false") + "]";
            }
            return s + "]}";
        }
        catch (...)
        {
            return std::string("{}");
        }
    }();
    return info.c_str();
}

extern "C" __attribute__((visibility("default"))) int32_t rqMoeSupportsArch(int32_t arch) noexcept
{
    std::string missing;
    return rq::hasAllKernelsForArch(arch, missing) ? 1 : 0;
}

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(rq::gLoggerMutex);
    rq::gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static rq::RQMoEPluginCreator sCreator;
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&sCreator};
    nbCreators = 1;
    return kCreators;
}

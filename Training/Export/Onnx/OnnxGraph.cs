// Builds an ONNX graph node by node (generated names, initializers, attributes); knows no model.
using Google.Protobuf;
using Onnx;

namespace DeepSeekCluster.Training.Export.Onnx;

public sealed class OnnxGraph
{
    public const int Opset = 18;
    readonly GraphProto graph = new() { Name = "deepseek_v3" };
    int next;

    string Fresh(string hint) => $"{hint}_{next++}";

    public string Initializer(string name, float[] data, params long[] dims)
    {
        var t = new TensorProto { Name = name, DataType = (int)TensorProto.Types.DataType.Float, RawData = ByteString.CopyFrom(System.Runtime.InteropServices.MemoryMarshal.AsBytes(data.AsSpan())) };
        t.Dims.AddRange(dims);
        graph.Initializer.Add(t);
        return name;
    }

    public string Ints(params long[] values)
    {
        var t = new TensorProto { Name = Fresh("const"), DataType = (int)TensorProto.Types.DataType.Int64, RawData = ByteString.CopyFrom(System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan())) };
        t.Dims.Add(values.Length);
        graph.Initializer.Add(t);
        return t.Name;
    }

    public string Scalar(float value) => Initializer(Fresh("scalar"), [value]);

    public static AttributeProto Attr(string name, long value) => new() { Name = name, Type = AttributeProto.Types.AttributeType.Int, I = value };
    public static AttributeProto Attr(string name, float value) => new() { Name = name, Type = AttributeProto.Types.AttributeType.Float, F = value };
    public static AttributeProto Attr(string name, long[] values)
    {
        var a = new AttributeProto { Name = name, Type = AttributeProto.Types.AttributeType.Ints };
        a.Ints.AddRange(values);
        return a;
    }

    /// <summary>ConstantOfShape's value: a one-element tensor of <paramref name="type"/>.</summary>
    public static AttributeProto Fill(TensorProto.Types.DataType type, float value)
    {
        var t = new TensorProto { DataType = (int)type };
        t.Dims.Add(1);
        if (type == TensorProto.Types.DataType.Bool) t.Int32Data.Add(value != 0 ? 1 : 0);
        else t.FloatData.Add(value);
        return new AttributeProto { Name = "value", Type = AttributeProto.Types.AttributeType.Tensor, T = t };
    }

    public string[] Node(string op, int outputs, string[] inputs, params AttributeProto[] attributes)
    {
        var node = new NodeProto { OpType = op, Name = Fresh(op) };
        node.Input.AddRange(inputs);
        var names = Enumerable.Range(0, outputs).Select(_ => Fresh(op.ToLowerInvariant())).ToArray();
        node.Output.AddRange(names);
        node.Attribute.AddRange(attributes);
        graph.Node.Add(node);
        return names;
    }

    public string Op(string op, string[] inputs, params AttributeProto[] attributes) => Node(op, 1, inputs, attributes)[0];

    public void Input(string name, TensorProto.Types.DataType type, params string[] dims) => graph.Input.Add(Value(name, type, dims));

    /// <summary>Names <paramref name="value"/> as a graph output (through an Identity, so the name is the caller's).</summary>
    public void Output(string name, string value, TensorProto.Types.DataType type, params string[] dims)
    {
        var node = new NodeProto { OpType = "Identity", Name = Fresh("Identity") };
        node.Input.Add(value);
        node.Output.Add(name);
        graph.Node.Add(node);
        graph.Output.Add(Value(name, type, dims));
    }

    static ValueInfoProto Value(string name, TensorProto.Types.DataType type, string[] dims)
    {
        var shape = new TensorShapeProto();
        foreach (var d in dims)
            shape.Dim.Add(long.TryParse(d, out long n) ? new TensorShapeProto.Types.Dimension { DimValue = n } : new TensorShapeProto.Types.Dimension { DimParam = d });
        return new ValueInfoProto { Name = name, Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } } };
    }

    public ModelProto ToModel() => new()
    {
        IrVersion = 8, ProducerName = "DeepSeekCluster", Graph = graph,
        OpsetImport = { new OperatorSetIdProto { Domain = "", Version = Opset } },
    };
}

//! Model weights as safetensors, named like the PyTorch `state_dict` of the same model.
//!
//! Why not burn's recorders: they store a random `ParamId` per parameter, so two identical
//! trainings give different bytes and the cache could never recognise them as equal. Here the
//! tensors are written in name order with no random metadata: same weights, same bytes.
//!
//! # Name mapping (burn field -> safetensors / PyTorch name)
//! | burn                          | vgg-small, vgg           | resnet                     |
//! |-------------------------------|--------------------------|----------------------------|
//! | `units[i].conv1.{weight,bias}`| `conv{i+1}.{weight,bias}`| `layers.{i}.conv1.*`       |
//! | `units[i].bn1.{gamma,beta}`   | `bn{i+1}.{weight,bias}`  | `layers.{i}.bn1.*`         |
//! | `units[i].bn1.running_*`      | `bn{i+1}.running_*`      | `layers.{i}.bn1.running_*` |
//! | `units[i].conv2`, `bn2`       | (none)                   | `layers.{i}.conv2.*`, `bn2`|
//! | `units[i].shortcut.weight`    | (none)                   | `layers.{i}.shortcut.weight` |
//! | `fc.weight` ([in, out])       | `fc.weight` ([out, in], transposed) | same            |
//! | `fc.bias`                     | `fc.bias`                | same                       |
//! Conv weights are `[out, in, kh, kw]` in both frameworks and are stored as they are.

use std::collections::BTreeMap;

use burn::module::{Param, RunningState};
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};

use super::model::{ArchConfig, Classifier};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("safetensors: {0}")]
    Format(String),
    #[error("tensor `{0}` is missing from the weights file")]
    Missing(String),
    #[error("tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape { name: String, found: Vec<usize>, expected: Vec<usize> },
}

type Named = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
    let dims = t.dims().to_vec();
    let v = t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    (dims, v)
}

fn prefix(arch: &ArchConfig, i: usize, part: &str) -> String {
    if arch.residual {
        format!("layers.{i}.{part}")
    } else {
        // vgg family: conv1/bn1 of unit i are conv{i+1}/bn{i+1}.
        match part {
            "conv1" => format!("conv{}", i + 1),
            "bn1" => format!("bn{}", i + 1),
            other => format!("layers.{i}.{other}"),
        }
    }
}

fn put_conv<B: Backend>(out: &mut Named, name: &str, c: &Conv2d<B>) {
    out.insert(format!("{name}.weight"), to_vec(c.weight.val()));
    if let Some(b) = &c.bias {
        out.insert(format!("{name}.bias"), to_vec(b.val()));
    }
}

fn put_bn<B: Backend>(out: &mut Named, name: &str, bn: &BatchNorm<B>) {
    out.insert(format!("{name}.weight"), to_vec(bn.gamma.val()));
    out.insert(format!("{name}.bias"), to_vec(bn.beta.val()));
    out.insert(format!("{name}.running_mean"), to_vec(bn.running_mean.value()));
    out.insert(format!("{name}.running_var"), to_vec(bn.running_var.value()));
}

/// All parameters under their PyTorch names.
pub fn named_tensors<B: Backend>(arch: &ArchConfig, m: &Classifier<B>) -> Named {
    let mut out = Named::new();
    for (i, u) in m.units.iter().enumerate() {
        put_conv(&mut out, &prefix(arch, i, "conv1"), &u.conv1);
        if let Some(bn) = &u.bn1 {
            put_bn(&mut out, &prefix(arch, i, "bn1"), bn);
        }
        if let Some(c) = &u.conv2 {
            put_conv(&mut out, &prefix(arch, i, "conv2"), c);
        }
        if let Some(bn) = &u.bn2 {
            put_bn(&mut out, &prefix(arch, i, "bn2"), bn);
        }
        if let Some(c) = &u.shortcut {
            put_conv(&mut out, &prefix(arch, i, "shortcut"), c);
        }
    }
    let (dims, w) = to_vec(m.fc.weight.val()); // [in, out]
    let (fin, fout) = (dims[0], dims[1]);
    let mut wt = vec![0f32; w.len()];
    for i in 0..fin {
        for o in 0..fout {
            wt[o * fin + i] = w[i * fout + o];
        }
    }
    out.insert("fc.weight".into(), (vec![fout, fin], wt));
    if let Some(b) = &m.fc.bias {
        out.insert("fc.bias".into(), to_vec(b.val()));
    }
    out
}

pub fn to_safetensors<B: Backend>(arch: &ArchConfig, m: &Classifier<B>) -> Result<Vec<u8>, WeightsError> {
    let named = named_tensors(arch, m);
    let bytes: BTreeMap<&String, (Vec<usize>, Vec<u8>)> =
        named.iter().map(|(k, (s, v))| (k, (s.clone(), v.iter().flat_map(|f| f.to_le_bytes()).collect()))).collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, (s, b))| TensorView::new(Dtype::F32, s.clone(), b).map(|v| ((*k).clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| WeightsError::Format(e.to_string()))?;
    safetensors::tensor::serialize(views, None).map_err(|e| WeightsError::Format(e.to_string()))
}

fn read_all(bytes: &[u8]) -> Result<Named, WeightsError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Format(e.to_string()))?;
    let mut out = Named::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(WeightsError::Format(format!("tensor `{name}` is {:?}, expected F32", view.dtype())));
        }
        let v = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.insert(name, (view.shape().to_vec(), v));
    }
    Ok(out)
}

fn take<B: Backend, const D: usize>(named: &Named, name: &str, like: &Tensor<B, D>) -> Result<Tensor<B, D>, WeightsError> {
    let (shape, v) = named.get(name).ok_or_else(|| WeightsError::Missing(name.into()))?;
    let expected = like.dims().to_vec();
    if *shape != expected {
        return Err(WeightsError::Shape { name: name.into(), found: shape.clone(), expected });
    }
    Ok(Tensor::from_data(TensorData::new(v.clone(), shape.clone()), &like.device()))
}

fn load_conv<B: Backend>(named: &Named, name: &str, c: &mut Conv2d<B>) -> Result<(), WeightsError> {
    c.weight = Param::from_tensor(take(named, &format!("{name}.weight"), &c.weight.val())?);
    if let Some(b) = &c.bias {
        let t = take(named, &format!("{name}.bias"), &b.val())?;
        c.bias = Some(Param::from_tensor(t));
    }
    Ok(())
}

fn load_bn<B: Backend>(named: &Named, name: &str, bn: &mut BatchNorm<B>) -> Result<(), WeightsError> {
    bn.gamma = Param::from_tensor(take(named, &format!("{name}.weight"), &bn.gamma.val())?);
    bn.beta = Param::from_tensor(take(named, &format!("{name}.bias"), &bn.beta.val())?);
    bn.running_mean = RunningState::new(take(named, &format!("{name}.running_mean"), &bn.running_mean.value())?);
    bn.running_var = RunningState::new(take(named, &format!("{name}.running_var"), &bn.running_var.value())?);
    Ok(())
}

/// Builds the model of `arch` and fills it from safetensors bytes.
pub fn from_safetensors<B: Backend>(arch: &ArchConfig, bytes: &[u8], device: &B::Device) -> Result<Classifier<B>, WeightsError> {
    let named = read_all(bytes)?;
    // Every parameter is overwritten below, but building one draws its lazy initial values from
    // burn's process-global RNG: under `seeded_init`'s lock, so that loading a model in one stage
    // cannot shift the random stream of a training that is initialising in another.
    let mut m = crate::ml::train::seeded_init::<B>(arch, 0, device);
    for (i, u) in m.units.iter_mut().enumerate() {
        load_conv(&named, &prefix(arch, i, "conv1"), &mut u.conv1)?;
        if let Some(bn) = u.bn1.as_mut() {
            load_bn(&named, &prefix(arch, i, "bn1"), bn)?;
        }
        if let Some(c) = u.conv2.as_mut() {
            load_conv(&named, &prefix(arch, i, "conv2"), c)?;
        }
        if let Some(bn) = u.bn2.as_mut() {
            load_bn(&named, &prefix(arch, i, "bn2"), bn)?;
        }
        if let Some(c) = u.shortcut.as_mut() {
            load_conv(&named, &prefix(arch, i, "shortcut"), c)?;
        }
    }
    let (shape, w) = named.get("fc.weight").ok_or_else(|| WeightsError::Missing("fc.weight".into()))?;
    let [fin, fout] = m.fc.weight.val().dims();
    if *shape != vec![fout, fin] {
        return Err(WeightsError::Shape { name: "fc.weight".into(), found: shape.clone(), expected: vec![fout, fin] });
    }
    let mut wt = vec![0f32; w.len()];
    for o in 0..fout {
        for i in 0..fin {
            wt[i * fout + o] = w[o * fin + i];
        }
    }
    m.fc.weight = Param::from_tensor(Tensor::from_data(TensorData::new(wt, [fin, fout]), device));
    if let Some(b) = &m.fc.bias {
        let t = take(&named, "fc.bias", &b.val())?;
        m.fc.bias = Some(Param::from_tensor(t));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn roundtrip_is_byte_stable() {
        let dev = Default::default();
        for arch in [ArchConfig::vgg_small(1), ArchConfig::resnet(1, &[4, 8], 1), ArchConfig::vgg(3, vec![4, 8], true)] {
            let m = crate::ml::train::seeded_init::<Flex>(&arch, 3, &dev);
            let a = to_safetensors(&arch, &m).unwrap();
            let back = from_safetensors::<Flex>(&arch, &a, &dev).unwrap();
            assert_eq!(a, to_safetensors(&arch, &back).unwrap(), "{}", arch.name);
        }
        let names = named_tensors(&ArchConfig::vgg_small(1), &crate::ml::train::seeded_init::<Flex>(&ArchConfig::vgg_small(1), 3, &dev));
        let keys: Vec<&str> = names.keys().map(|s| s.as_str()).collect();
        assert_eq!(
            keys,
            [
                "conv1.bias",
                "conv1.weight",
                "conv2.bias",
                "conv2.weight",
                "conv3.bias",
                "conv3.weight",
                "conv4.bias",
                "conv4.weight",
                "fc.bias",
                "fc.weight"
            ]
        );
        assert_eq!(names["fc.weight"].0, vec![2, 64]);
    }
}

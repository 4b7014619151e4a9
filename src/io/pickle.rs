//! PyTorch pickle checkpoints (`pytorch_model.bin`, sharded with
//! `pytorch_model.bin.index.json`), read through candle's pickle interpreter, which turns the
//! pickle's opcodes into plain values and never imports or calls anything. What sani accepts
//! is narrower still: the pickle must be a state dict (a dict, or an `OrderedDict`) whose every
//! value is a tensor (`torch._utils._rebuild_tensor_v2`, optionally wrapped as a parameter);
//! any other entry is refused with its key named. The tensors are turned into a safetensors
//! image in memory, so the rest of sani sees a safetensors checkpoint and writes one.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::pickle::{Object, PthTensors, Stack};
use std::io::BufReader;
use std::path::Path;

/// The output name of a pickle weight file: `pytorch_model.bin` -> `model.safetensors`,
/// `pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors`.
pub fn safetensors_name(bin: &str) -> String {
    let stem = bin.strip_suffix(".bin").unwrap_or(bin);
    let stem = stem.strip_prefix("pytorch_").unwrap_or(stem);
    format!("{stem}.safetensors")
}

/// Whether a weight file name is a PyTorch pickle.
pub fn is_pickle(file: &str) -> bool {
    file.ends_with(".bin")
}

/// Checks that `path` holds a state dict of plain tensors and returns their names.
fn state_dict_names(path: &Path) -> Result<Vec<String>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        anyhow!(
            "{}: not a zip-format torch.save file ({e}); the legacy format of torch < 1.6 is not \
             read: re-save it with a current torch, or convert it to safetensors",
            path.display()
        )
    })?;
    let names: Vec<String> = zip
        .file_names()
        .map(|f| f.map(|f| f.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow!("{}: unreadable archive: {e}", path.display()))?;
    let pkl: Vec<String> = names
        .into_iter()
        .filter(|f| f.ends_with("/data.pkl") || f == "data.pkl")
        .collect();
    let [pkl] = pkl.as_slice() else {
        bail!(
            "{}: expected one data.pkl in the archive, found {}",
            path.display(),
            pkl.len()
        );
    };
    let dir_name = pkl.strip_suffix(".pkl").expect("filtered").to_string();
    let mut reader = BufReader::new(zip.by_name(pkl)?);
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| anyhow!("{}: unreadable pickle: {e}", path.display()))?;
    let obj = stack
        .finalize()
        .map_err(|e| anyhow!("{}: unreadable pickle: {e}", path.display()))?;
    let Object::Dict(items) = obj else {
        bail!(
            "{}: the pickle is not a state dict of tensors (its top object is {}); sani reads \
             only plain tensors, never pickled Python objects",
            path.display(),
            describe(&obj)
        );
    };
    let mut names = Vec::with_capacity(items.len());
    for (key, value) in items {
        // torch.save of a module's state dict adds its version records as `_metadata`.
        if key == Object::Unicode("_metadata".into()) && matches!(value, Object::Dict(_)) {
            continue;
        }
        let Object::Unicode(name) = key else {
            bail!(
                "{}: a state-dict key is {}, not a string",
                path.display(),
                describe(&key)
            );
        };
        let what = describe(&value);
        match value.into_tensor_info(Object::Unicode(name.clone()), Path::new(&dir_name)) {
            Ok(Some(_)) => names.push(name),
            Ok(None) => bail!(
                "{}: entry `{name}` is {what}, not a tensor; sani reads only plain tensors",
                path.display()
            ),
            Err(e) => bail!(
                "{}: entry `{name}`: unsupported tensor ({e})",
                path.display()
            ),
        }
    }
    Ok(names)
}

/// A short description of a pickled value for errors.
fn describe(o: &Object) -> String {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => format!("the class {module_name}.{class_name}"),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => match &**callable {
            Object::Class {
                module_name,
                class_name,
            } => format!("a {module_name}.{class_name} object"),
            _ => "a constructed object".into(),
        },
        Object::Dict(_) => "a dict".into(),
        Object::List(_) => "a list".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::Unicode(_) => "a string".into(),
        Object::Int(_) | Object::Long(_) => "an integer".into(),
        Object::Float(_) => "a float".into(),
        Object::Bool(_) => "a bool".into(),
        Object::None => "None".into(),
        _ => "an unsupported value".into(),
    }
}

/// The tensors of the pickle checkpoint `path` as a safetensors file image (names and dtypes
/// kept), after [`state_dict_names`]'s checks.
pub fn to_safetensors(path: &Path) -> Result<Vec<u8>> {
    let mut names = state_dict_names(path)?;
    names.sort();
    let pth = PthTensors::new(path, None)
        .map_err(|e| anyhow!("{}: cannot read the tensors: {e}", path.display()))?;
    let mut tensors = Vec::with_capacity(names.len());
    for name in &names {
        let t = pth
            .get(name)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", path.display()))?
            .ok_or_else(|| anyhow!("{}: tensor `{name}` not found", path.display()))?;
        tensors.push((name.clone(), t.contiguous()?));
    }
    safetensors::tensor::serialize(tensors, None)
        .map_err(|e| anyhow!("{}: cannot convert to safetensors: {e}", path.display()))
}

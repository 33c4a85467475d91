//! PEM in and out, for the files users hand to openssl and to `--trust-bundle`.

fn encode(tag: &str, der: &[u8]) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(tag, der.to_vec()), config)
}

/// PEM-encodes DER certificates, in order.
pub fn encode_certs<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> String {
    certs.into_iter().map(|der| encode("CERTIFICATE", der)).collect()
}

/// PEM-encodes an unencrypted PKCS#8 private key.
pub fn encode_pkcs8_key(der: &[u8]) -> String {
    encode("PRIVATE KEY", der)
}

/// Reads every CERTIFICATE block, in order. Errors name what was wrong.
pub fn decode_certs(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let blocks = ::pem::parse_many(text).map_err(|e| format!("not valid PEM: {e}"))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect();
    if certs.is_empty() {
        return Err("no CERTIFICATE blocks found".into());
    }
    Ok(certs)
}

/// Reads the first private key block (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`).
pub fn decode_key(text: &str) -> Result<(String, Vec<u8>), String> {
    let blocks = ::pem::parse_many(text).map_err(|e| format!("not valid PEM: {e}"))?;
    blocks
        .into_iter()
        .find(|b| b.tag().ends_with("PRIVATE KEY"))
        .map(|b| (b.tag().to_owned(), b.into_contents()))
        .ok_or_else(|| "no PRIVATE KEY block found".into())
}

/// Writes `svid.pem` (the chain), `key.pem` (mode 0600) and `bundle.pem` into
/// `dir`, creating it: the layout openssl users expect, shared by
/// `control-plane x509 mint` and `node-agent svid fetch --write`.
pub fn write_svid_dir(
    dir: &std::path::Path,
    chain: &[Vec<u8>],
    key_pkcs8: &[u8],
    bundle: &[Vec<u8>],
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, contents: String, mode: u32| -> std::io::Result<()> {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)?;
        // An existing file keeps its old mode on open; set it explicitly.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents.as_bytes())
    };
    write("key.pem", encode_pkcs8_key(key_pkcs8), 0o600)?;
    write(
        "svid.pem",
        encode_certs(chain.iter().map(|c| c.as_slice())),
        0o644,
    )?;
    write(
        "bundle.pem",
        encode_certs(bundle.iter().map(|c| c.as_slice())),
        0o644,
    )
}

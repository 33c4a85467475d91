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
